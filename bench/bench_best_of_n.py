"""ICT Best-of-N Sampler in a real ComfyUI on this CPU: a pruning funnel against plain best-of-n, side by side.

Run with ComfyUI's Python (it imports ComfyUI in-process through tests/comfyui_inproc.py, the bootstrap the
real-ComfyUI test uses):

    $COMFYUI_PYTHON bench/bench_best_of_n.py --comfyui $COMFYUI_DIR --checkpoint /path/to/sd15.safetensors \
        --ict /path/to/ict.safetensors [--render]

Part 1, side by side (chunk 1): best-of-16 with a two-cut funnel, a plain best-of-16 and a plain best-of-4
(about the funnel's cost), one after the other in one process with the models loaded once (a warm-up run
first); rounds alternate the order.  Candidate-steps and model evaluations are counted with ComfyUI's unet
function wrapper (tests/comfyui_inproc.CallCounter), independently of the node's own count.  Part 2, the
audit: the funnel with audit on over a set of prompts, each cut's rank correlation with the final scores
and whether it kept the true best.  With random weights (the checkpoint and the ICT model) this checks the
mechanics and the costs only: the scores and correlations say nothing about real images.  Results:
bench/out/best_of_n_funnel.json (or --out); --render writes them (several --out: each) into docs/BENCHMARKS.md's
sampler section.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out" / "best_of_n_funnel.json"
DOC = ROOT / "docs" / "BENCHMARKS.md"
BEGIN, END = "<!-- best_of_n:begin -->", "<!-- best_of_n:end -->"
PROMPTS = [
    "a red fox standing in fresh snow at sunrise, photograph", "a bowl of ramen with a soft boiled egg",
    "an old lighthouse on a rocky coast in a storm", "a watercolor painting of a hummingbird",
    "a city street at night in the rain, neon signs", "a cozy reading nook with a cat on a blanket",
    "a vintage red bicycle leaning against a brick wall", "a snowy mountain range under a starry sky",
    "a close-up of a dew drop on a green leaf", "a medieval castle on a hill at dusk",
    "a cup of coffee with latte art on a wooden table", "a herd of elephants crossing a river",
    "an astronaut riding a horse on the moon", "a field of sunflowers under a blue sky",
    "a wooden sailboat on a calm lake at dawn", "a portrait of an old fisherman, black and white",
    "a plate of sushi on a slate board", "a futuristic train in a glass tunnel",
    "a stack of pancakes with blueberries and syrup", "a koi pond with lily pads in autumn",
    "a desert canyon with a winding river", "a steaming teapot next to a stack of books",
]
log = logging.getLogger("bench_best_of_n")


def measure(args) -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    import torch

    import comfyui_inproc as ci

    ict = Path(args.ict).resolve()
    ckpt = Path(args.checkpoint).resolve()
    job = {"comfy_dir": args.comfyui, "checkpoints": str(ckpt.parent), "checkpoint": ckpt.name,
           "ict_dir": str(ict.parent), "ict_model": ict.name, "prompt": PROMPTS[0], "size": args.size}
    cn, pack, model, vae, pos, neg, latent, ict_model = ci.setup(job)
    seen = ci.node_search()
    node = pack.NODE_CLASS_MAPPINGS["ICTBestOfNSampler"]
    funnel = {"prune_at": args.prune_at, "survivors": args.survivors}
    configs = {"funnel": dict(n=args.n, **funnel),
               "plain": dict(n=args.n, prune_at="1.0", survivors=str(args.n)),
               "small": dict(n=args.small_n, prune_at="1.0", survivors=str(args.small_n))}

    def run(cfg, positive=pos, prompt=PROMPTS[0], audit=False, chunk=args.chunk, steps=args.steps, **kw):
        counter = ci.CallCounter()
        seen.clear()
        t = time.perf_counter()
        r = ci.call(node, model=counter.wrap(model), seed=args.seed, steps=steps, cfg=args.cfg, sampler_name="euler",
                    scheduler="normal", positive=positive, negative=neg, latent_image=latent, denoise=1.0, vae=vae,
                    ict_model=ict_model, prompt=prompt, k=1, score_by="ict", chunk=chunk, audit=audit,
                    **{**configs.get(cfg, {}), **kw}).result
        return {"wall_s": time.perf_counter() - t, "candidate_evals": counter.candidate_evals,
                "model_calls": counter.calls, "kept_seed": r[2][0], "kept_score": r[3][0], "report": r[4],
                "search": seen[-1] if seen else None}

    res = {"when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cpu": platform.processor() or
           platform.machine(), "cores": os.cpu_count(), "gpu": torch.cuda.is_available(),
           "threads": torch.get_num_threads(), "torch": torch.__version__, "comfyui": _version(args.comfyui),
           "ict": _ict_facts(ict), "load_start": os.getloadavg(),
           "args": {k: v for k, v in vars(args).items() if k not in ("render", "out")}}
    t_start = time.perf_counter()
    with torch.inference_mode():
        if args.rounds:
            run("small", steps=1)  # warm-up: first touch of the weights, allocator
        rounds = []
        for i in range(args.rounds):
            names = ["funnel", "plain", "small"] if i % 2 == 0 else ["small", "plain", "funnel"]
            rows = {}
            for c in names:
                r = run(c)
                r.pop("search")
                rows[c] = r
                log.info("round %d: %s %.1f s, %d candidate-steps", i + 1, c, r["wall_s"], r["candidate_evals"])
            rounds.append(rows)
        res["rounds"] = rounds
        res["audit"] = _audit(args, cn, run, job["clip"])
    res["load_end"], res["total_s"] = os.getloadavg(), time.perf_counter() - t_start
    return res


def _audit(args, cn, run, clip) -> list[dict]:
    """The funnel with audit on for each prompt (its own conditioning); per cut: Spearman, the true best kept."""
    rows = []
    for p in PROMPTS[:args.audit_prompts]:
        positive = cn.CLIPTextEncode().encode(clip, p)[0]
        r = run("audit", positive=positive, prompt=p, audit=True, chunk=args.audit_n, steps=args.audit_steps,
                n=args.audit_n, prune_at=args.audit_prune_at, survivors=args.audit_survivors)
        a = r["search"].audit()
        rows.append({"prompt": p, "wall_s": r["wall_s"], "candidate_evals": r["candidate_evals"],
                     "stages": [{"step": s.step, "spearman": s.spearman, "best_rank": s.best_rank,
                                 "survived": s.survived} for s in a.stages], "lost_best": a.lost_best})
        log.info("audit %d/%d: %s", len(rows), args.audit_prompts, rows[-1]["stages"])
    return rows


def _ict_facts(path: Path) -> dict:
    """The ICT file's name, size and parameter count (from its safetensors header), to say which model ran."""
    with open(path, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    params = sum(math.prod(t["shape"]) for k, t in header.items() if k != "__metadata__")
    return {"name": path.name, "bytes": path.stat().st_size, "params": params,
            "metadata": header.get("__metadata__", {})}


def _version(comfy_dir: str) -> str:
    f = Path(comfy_dir) / "comfyui_version.py"
    return f.read_text().split('"')[1] if f.is_file() else "?"


def render(res: dict) -> str:
    a = res["args"]
    rounds = res["rounds"]
    med = {c: statistics.median(r[c]["wall_s"] for r in rounds) for c in ("funnel", "plain", "small")}
    r0 = rounds[0]
    head = (f"| | best-of-{a['n']}, funnel (prune_at {a['prune_at']}, survivors {a['survivors']}) | plain "
            f"best-of-{a['n']} | plain best-of-{a['small_n']} |")
    ict = res.get("ict")
    model = (f"a random-weight ICT model of {ict['params'] / 1e6:.2f} M parameters ({ict['bytes'] / 1e6:.1f} MB "
             f"safetensors{', ' + res['ict_desc'] if res.get('ict_desc') else ''})" if ict else "a random ICT model")
    where = (f"{res['cpu']}, {res['cores']} CPU cores, {'a GPU present (unused: --cpu)' if res['gpu'] else 'no GPU'}"
             if "cores" in res else res["cpu"])
    load = (f" Load average (1 min) {res['load_start'][0]:.1f} at the start, {res['load_end'][0]:.1f} at the end "
            f"(other jobs shared the cores); the whole run took {res['total_s'] / 60:.0f} min."
            if "load_end" in res else " The cores were shared with other jobs.")
    lines = [f"Measured {res['when']} on {where} ({res['threads']} torch threads), torch {res['torch']}, "
             f"ComfyUI {res['comfyui']} --cpu imported in one process, random-weight SD1.5 at {a['size']}x"
             f"{a['size']}, euler/normal, {a['steps']} steps, cfg {a['cfg']:g}, chunk {a['chunk']}, {model}."
             f"{load} Random weights: this checks the mechanics and the costs, not the quality of a pick.", "",
             f"Command: `{res['command']}`", "", head, "|---|---:|---:|---:|"]
    for label, key in [("candidate-steps = model evaluations (euler), counted", "candidate_evals"),
                       ("diffusion model calls, counted", "model_calls")]:
        lines.append(f"| {label} | " + " | ".join(str(r0[c][key]) for c in ("funnel", "plain", "small")) + " |")
    lines.append(f"| wall time (s), median of {len(rounds)} round{'s' if len(rounds) > 1 else ''} | "
                 + " | ".join(f"{med[c]:.1f}" for c in ("funnel", "plain", "small")) + " |")
    if len(rounds) > 1:
        lines.append("| wall time (s) of each round, in order | " + " | ".join(
            ", ".join(f"{r[c]['wall_s']:.1f}" for r in rounds) for c in ("funnel", "plain", "small")) + " |")
    ratio = {c: statistics.median(r[c]["wall_s"] / r["plain"]["wall_s"] for r in rounds)
             for c in ("funnel", "plain", "small")}
    lines.append(f"| wall time / plain best-of-{a['n']} of the same round, median | "
                 + " | ".join(f"{ratio[c]:.2f}" for c in ("funnel", "plain", "small")) + " |")
    lines.append("| kept seed (its final score) | " + " | ".join(
        f"{r0[c]['kept_seed']} ({r0[c]['kept_score']:.4f})" for c in ("funnel", "plain", "small")) + " |")
    audit = res.get("audit") or []
    if audit:
        cuts = len(audit[0]["stages"])
        lines += ["", f"Audit over {len(audit)} prompts (each sampled with its own conditioning): best-of-"
                  f"{a['audit_n']}, {a['audit_steps']} steps, prune_at {a['audit_prune_at']}, survivors "
                  f"{a['audit_survivors']}, chunk {a['audit_n']} (every candidate finished and scored at every cut, "
                  f"{audit[0]['candidate_evals']} candidate-steps a prompt).", "",
                  "| cut | step | median Spearman (early vs final) | prompts whose true best survived the cut |",
                  "|---|---:|---:|---:|"]
        for j in range(cuts):
            rhos = [r["stages"][j]["spearman"] for r in audit if r["stages"][j]["spearman"] is not None]
            kept = sum(r["stages"][j]["survived"] for r in audit)
            rho = f"{statistics.median(rhos):+.3f} ({len(rhos)} defined)" if rhos else "undefined"
            lines.append(f"| {j + 1} | {audit[0]['stages'][j]['step']} | {rho} | {kept} of {len(audit)} |")
        lost = sum(r["lost_best"] for r in audit)
        lines += ["", f"The funnel kept the true best for {len(audit) - lost} of {len(audit)} prompts."]
    return "\n".join(lines)


def write_doc(text: str) -> None:
    doc = DOC.read_text()
    start, end = doc.index(BEGIN) + len(BEGIN), doc.index(END)
    DOC.write_text(doc[:start] + "\n" + text + "\n" + doc[end:])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--comfyui", required=False)
    p.add_argument("--checkpoint", required=False)
    p.add_argument("--ict", required=False)
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--small-n", type=int, default=4)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--prune-at", default="0.25, 0.5")
    p.add_argument("--survivors", default="2, 1")
    p.add_argument("--cfg", type=float, default=1.0)
    p.add_argument("--chunk", type=int, default=1, help="candidates sampled at once in the side-by-side runs")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--seed", type=int, default=100)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--audit-prompts", type=int, default=20)
    p.add_argument("--audit-n", type=int, default=8)
    p.add_argument("--audit-steps", type=int, default=3)
    p.add_argument("--audit-prune-at", default="0.3, 0.6")
    p.add_argument("--audit-survivors", default="4, 2")
    p.add_argument("--ict-desc", default="", help="what the ICT model is, for the rendered text (e.g. its "
                   "architecture)")
    p.add_argument("--out", action="append", type=Path, help=f"the results file (default {OUT.relative_to(ROOT)}); "
                   "with --render several, rendered one after the other")
    p.add_argument("--render", action="store_true", help="only rewrite docs/BENCHMARKS.md from the last results")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    outs = [o.resolve() for o in args.out or [OUT]]  # before ComfyUI chdirs into its folder
    if args.render:
        write_doc("\n\n".join(render(json.loads(o.read_text())) for o in outs))
        return
    if not (args.comfyui and args.checkpoint and args.ict):
        p.error("--comfyui, --checkpoint and --ict are needed to measure (or --render)")
    res = measure(args)
    res["ict_desc"] = args.ict_desc
    res["command"] = "python bench/bench_best_of_n.py " + " ".join(
        f"--{k.replace('_', '-')} '{v}'" if isinstance(v, str) else f"--{k.replace('_', '-')} {v}"
        for k, v in res["args"].items() if k not in ("comfyui", "checkpoint", "ict", "ict_desc"))
    outs[0].parent.mkdir(parents=True, exist_ok=True)
    outs[0].write_text(json.dumps(res, indent=1))
    log.info("%s", render(res))


if __name__ == "__main__":
    main()
