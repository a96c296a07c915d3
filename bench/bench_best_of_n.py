"""ICT Best-of-N Sampler: best-of-8 with and without pruning in a real ComfyUI on this CPU, side by side.

Run with ComfyUI's Python (it imports ComfyUI in-process through tests/comfyui_inproc.py, the same
bootstrap the real-ComfyUI test uses) under the benchmark lock:

    flock /work/bench.lock $COMFYUI_PYTHON bench/bench_best_of_n.py --comfyui $COMFYUI_DIR \
        --checkpoint /path/to/sd15.safetensors --ict /path/to/ict.safetensors [--render]

Per round the two configurations alternate (A = prune_at 1.0, a plain best-of-8; B = pruned), in one
process with the models loaded once (a warm-up run first), so the ratios B/A within a round cancel the
drift of a shared machine; the median over rounds is reported.  Model evaluations are counted per
candidate with ComfyUI's unet function wrapper (tests/comfyui_inproc.CallCounter), independently of the
node's own count.  Results: bench/out/best_of_n_chunk{C}.json; --render writes their tables into docs/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = ROOT / "bench" / "out"  # best_of_n_chunk{C}.json, one per chunk size
DOC = ROOT / "docs" / "BENCHMARKS.md"
BEGIN, END = "<!-- best_of_n:begin -->", "<!-- best_of_n:end -->"
PROMPT = "a red fox standing in fresh snow at sunrise, photograph"


def measure(args) -> dict:
    sys.path.insert(0, str(ROOT / "tests"))
    import comfyui_inproc as ci
    import torch

    ict = Path(args.ict).resolve()
    ckpt = Path(args.checkpoint).resolve()
    job = {"comfy_dir": args.comfyui, "checkpoints": str(ckpt.parent), "checkpoint": ckpt.name,
           "ict_dir": str(ict.parent), "ict_model": ict.name, "prompt": PROMPT, "size": args.size}
    cn, pack, model, vae, pos, neg, latent, ict_model = ci.setup(job)
    node = pack.NODE_CLASS_MAPPINGS["ICTBestOfNSampler"]()
    configs = {"A": dict(prune_at=1.0, survivors=args.n), "B": dict(prune_at=args.prune_at, survivors=args.survivors)}

    def run(cfg):
        counter = ci.CallCounter()
        t = time.perf_counter()
        r = node.sample(counter.wrap(model), args.seed, args.steps, 7.0, "euler", "normal", pos, neg, latent, 1.0,
                        vae, ict_model, PROMPT, args.n, 1, "ict", chunk=args.chunk, audit=False, **configs[cfg])
        return {"wall_s": time.perf_counter() - t, "candidate_evals": counter.candidate_evals,
                "model_calls": counter.calls, "kept_seed": r["result"][2][0], "report": r["result"][4]}

    run("B")  # warm-up: first-touch of the weights, allocator
    rounds = []
    for i in range(args.rounds):
        pair = {c: run(c) for c in (("A", "B") if i % 2 == 0 else ("B", "A"))}
        pair["ratio_wall_B_over_A"] = pair["B"]["wall_s"] / pair["A"]["wall_s"]
        rounds.append(pair)
        print(f"round {i + 1}: A {pair['A']['wall_s']:.1f} s, B {pair['B']['wall_s']:.1f} s", flush=True)
    med = {c: statistics.median(r[c]["wall_s"] for r in rounds) for c in "AB"}
    return {"when": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cpu": platform.processor() or
            platform.machine(), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "args": {k: v for k, v in vars(args).items() if k not in ("render",)}, "rounds": rounds,
            "median_wall_s": med, "median_ratio": statistics.median(r["ratio_wall_B_over_A"] for r in rounds)}


def render(res: dict) -> str:
    a = res["args"]
    r0 = res["rounds"][0]
    rows = [
        ("candidate-steps (euler: model evaluations per candidate), counted", r0["A"]["candidate_evals"],
         r0["B"]["candidate_evals"], f"{r0['B']['candidate_evals'] / r0['A']['candidate_evals']:.3f}"),
        ("diffusion model calls (batches of up to chunk candidates), counted", r0["A"]["model_calls"],
         r0["B"]["model_calls"], f"{r0['B']['model_calls'] / r0['A']['model_calls']:.3f}"),
        ("images decoded and scored", a["n"], f"{a['n']} + {a['survivors']}", ""),
        (f"wall time (s), median of {len(res['rounds'])} rounds", f"{res['median_wall_s']['A']:.1f}",
         f"{res['median_wall_s']['B']:.1f}", f"{res['median_ratio']:.3f} (pair by pair)"),
    ]
    lines = [f"Measured {res['when']} on {res['cpu']} ({res['threads']} torch threads), torch {res['torch']}, "
             f"ComfyUI 0.3.64 --cpu, random-weight SD1.5 at {a['size']}x{a['size']}, euler/normal, {a['steps']} "
             f"steps, cfg 7, n={a['n']}, chunk={a['chunk']}, tiny random ICT model. The machine was shared "
             f"with other jobs (A and B alternate, ratios pair by pair).", "",
             f"Command: `{res['command']}`", "",
             f"| best-of-{a['n']} | A: no pruning (prune_at 1.0) | B: prune_at {a['prune_at']}, "
             f"{a['survivors']} survivors | B / A |", "|---|---:|---:|---:|"]
    lines += [f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} |" for r in rows]
    lines += ["", "Per round (s): " + "; ".join(f"A {r['A']['wall_s']:.1f} / B {r['B']['wall_s']:.1f}"
                                                 for r in res["rounds"])]
    return "\n".join(lines)


def write_doc(text: str) -> None:
    doc = DOC.read_text()
    start, end = doc.index(BEGIN) + len(BEGIN), doc.index(END)
    DOC.write_text(doc[:start] + "\n" + text + "\n" + doc[end:])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--comfyui", required=True)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--ict", required=True)
    p.add_argument("--n", type=int, default=8)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--prune-at", type=float, default=0.25)
    p.add_argument("--survivors", type=int, default=2)
    p.add_argument("--chunk", type=int, default=8)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--seed", type=int, default=100)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--render", action="store_true", help="only rewrite docs/BENCHMARKS.md from the last results")
    args = p.parse_args()
    if args.render:
        write_doc("\n\n".join(render(json.loads(f.read_text()))
                                for f in sorted(OUT_DIR.glob("best_of_n_chunk*.json"), reverse=True)))
        return
    res = measure(args)
    res["command"] = "python bench/bench_best_of_n.py " + " ".join(
        f"--{k.replace('_', '-')} {v}" for k, v in res["args"].items()
        if k in ("n", "steps", "prune_at", "survivors", "chunk", "size", "rounds"))
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    (OUT_DIR / f"best_of_n_chunk{args.chunk}.json").write_text(json.dumps(res, indent=1))
    print(render(res))


if __name__ == "__main__":
    main()
