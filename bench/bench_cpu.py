"""CPU benchmark: ict_core against the model card's quick-start loop, side by side, at ViT-H-14 shapes.

    .venv/bin/python bench/bench_cpu.py                       # 3 rounds, work folder /tmp/ict-bench
    .venv/bin/python bench/bench_cpu.py --rounds 5 --work DIR
    .venv/bin/python bench/bench_cpu.py --tiny --work /tmp/ict-bench-tiny   # smoke test, tiny CLIP
    .venv/bin/python bench/bench_cpu.py --render               # rewrite docs/BENCHMARKS.md from bench/out/cpu.json

Every measured run is a fresh child process (cold load time and the child's peak RSS are real).
One round runs, in this order:
  A  ref     the model card's loop: load ICT, best-of-8 for one prompt; load HP, best-of-8 with ICT+HP
  B  proj    ict_core: Scorer.load(ICT) with an empty prompt cache, best-of-8; then Scorer.load(ICT, HP)
             (again an empty cache), best-of-8 with ICT+HP
  C  cached  ict_core with the prompt cache warmed by B: best-of-8, prompt-cache hit latency, then the
             floor: one bare batched fp32 vision forward of the same 8 images (torch.inference_mode)
Rounds repeat A B C, so reference and project alternate and every ratio is taken pair by pair
(same round) before the median, which cancels the drift of a shared machine.

Results go to bench/out/cpu.json (raw runs + summary); --render turns them into the tables of
docs/BENCHMARKS.md (between the <!-- cpu:begin/end --> markers). bench/bench_cache.py runs once at
the end (prompt-hit and gallery-search latency of the embedding cache); --skip-cache-bench skips it.
"""
from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

log = logging.getLogger("bench.cpu")
HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
DOC = C.ROOT / "docs" / "BENCHMARKS.md"


# ------------------------------------------------------------------------------------------------------ children
def _imports() -> float:
    """Import what both sides need before any timer starts, so load times compare like with like."""
    t = time.perf_counter()
    import open_clip  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from transformers import CLIPModel  # noqa: F401

    import ict_core.scorer  # noqa: F401
    return time.perf_counter() - t


def child_ref(args) -> dict:
    from PIL import Image
    from reference_loop import ReferenceLoop

    import_s = _imports()
    cfg = json.loads((args.work / "config.json").read_text())
    paths = C.image_paths(args.work)
    prompts = [C.PROMPT] * len(paths)
    ref = ReferenceLoop(cfg)
    t = time.perf_counter()
    ref.load_ict(args.work / "ICT")
    load_s = time.perf_counter() - t
    rss_load = C.maxrss_bytes()
    t = time.perf_counter()
    scores = ref([Image.open(p) for p in paths], prompts)
    best = max(range(len(scores)), key=lambda i: scores[i][0])
    score_s = time.perf_counter() - t
    rss_ict = C.maxrss_bytes()
    out = dict(side="ref", import_s=import_s, load_s=load_s, score_s=score_s, best=best,
               ict=[s[0] for s in scores], rss_after_load_bytes=rss_load, rss_ict_bytes=rss_ict)
    if args.hp:
        t = time.perf_counter()
        ref.load_hp(args.work / "HP")
        hp_load_s = time.perf_counter() - t
        t = time.perf_counter()
        scores = ref([Image.open(p) for p in paths], prompts, use_hp=True)
        combined = [s[0] * s[1] for s in scores]
        best_hp = max(range(len(scores)), key=lambda i: combined[i])
        hp_score_s = time.perf_counter() - t
        out.update(hp_load_s=load_s + hp_load_s, hp_score_s=hp_score_s, hp_best=best_hp,
                   hp_ict=[s[0] for s in scores], hp=[s[1] for s in scores], hp_raw=[s[2] for s in scores],
                   combined=combined)
    out["timings"] = ref.timings
    return out


def _proj_run(args, hp: bool, cache_dir: Path) -> dict:
    """Load ict_core (ICT, + HP if asked) and pick the best of the 8 images once, timed."""
    from ict_core.cache import EmbeddingCache
    from ict_core.scorer import Scorer

    t = time.perf_counter()
    scorer = Scorer.load(args.work / "ict.safetensors", args.work / "hp.safetensors" if hp else None,
                         device="cpu", precision="fp32", cache=EmbeddingCache(cache_dir),
                         config=_config_arg(args))
    load_s = time.perf_counter() - t
    rss_load = C.maxrss_bytes()
    t = time.perf_counter()
    results = scorer.score(C.image_paths(args.work), C.PROMPT)
    best = max(range(len(results)), key=lambda i: results[i].score)
    score_s = time.perf_counter() - t
    return dict(load_s=load_s, score_s=score_s, best=best, results=results, rss_load=rss_load,
                rss_score=C.maxrss_bytes(), cache_stats=dict(scorer.last_cache_stats))


def child_proj(args) -> dict:
    import_s = _imports()
    run = _proj_run(args, False, args.cache_dir)
    out = dict(side="proj", import_s=import_s, load_s=run["load_s"], score_s=run["score_s"], best=run["best"],
               ict=[r.ict for r in run["results"]], rss_after_load_bytes=run["rss_load"],
               rss_ict_bytes=run["rss_score"], cache_stats=run["cache_stats"])
    if args.hp:
        del run
        gc.collect()
        run = _proj_run(args, True, Path(str(args.cache_dir) + "-hp"))
        results = run["results"]
        out.update(hp_load_s=run["load_s"], hp_score_s=run["score_s"], hp_best=run["best"],
                   hp_ict=[r.ict for r in results], hp=[r.hp for r in results],
                   hp_raw=[r.hp_raw for r in results], combined=[r.score for r in results],
                   hp_cache_stats=run["cache_stats"])
    return out


def child_cached(args) -> dict:
    import statistics

    import_s = _imports()
    from ict_core.cache import EmbeddingCache
    from ict_core.scorer import Scorer

    paths = C.image_paths(args.work)
    t = time.perf_counter()
    scorer = Scorer.load(args.work / "ict.safetensors", device="cpu", precision="fp32",
                         cache=EmbeddingCache(args.cache_dir), config=_config_arg(args))
    load_s = time.perf_counter() - t
    t = time.perf_counter()
    results = scorer.score(paths, C.PROMPT)
    best = max(range(len(results)), key=lambda i: results[i].score)
    score_s = time.perf_counter() - t
    stats = dict(scorer.last_cache_stats)
    if stats["prompt_hits"] != 1:
        raise SystemExit(f"the prompt cache was not warm: {stats}")
    hits = []
    for _ in range(300):  # a hit as the scorer sees it: lookup + tensor, no text tower
        t = time.perf_counter()
        scorer.encode_prompts([C.PROMPT])
        hits.append(time.perf_counter() - t)
    hits.sort()
    # the floor, in the same process right after: one bare batched fp32 vision forward of the same 8 images,
    # pixels prepared outside the timer. It runs warm (second forward of the process), so the floor is, if
    # anything, flattered: project / floor is a conservative ratio.
    import torch

    from ict_core import preprocess

    ict = scorer.modules.ict
    pixels = preprocess.pixel_values_for([r.load() for r in preprocess.as_refs(paths)], torch.device("cpu"),
                                         torch.float32)
    floor = []
    with torch.inference_mode():
        for _ in range(args.floor_repeats):
            t = time.perf_counter()
            ict.visual_projection(ict.vision_model(pixel_values=pixels).pooler_output)
            floor.append(time.perf_counter() - t)
    # and the same best-of-8 once more, warm like the floor: project / floor without first-call effects
    t = time.perf_counter()
    scorer.score(paths, C.PROMPT)
    warm_score_s = time.perf_counter() - t
    return dict(side="cached", import_s=import_s, load_s=load_s, score_s=score_s, best=best,
                ict=[r.ict for r in results], cache_stats=stats,
                hit_p50_ms=statistics.median(hits) * 1e3, hit_p95_ms=hits[int(0.95 * len(hits))] * 1e3,
                floor_s=floor[0], floor_all_s=floor, warm_score_s=warm_score_s)


def child_profile(args) -> dict:
    """One project best-of-8 under torch.profiler: where the end-to-end time goes (not part of the rounds)."""
    _imports()
    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from ict_core import preprocess
    from ict_core.scorer import Scorer

    paths = C.image_paths(args.work)
    scorer = Scorer.load(args.work / "ict.safetensors", device="cpu", precision="fp32", config=_config_arg(args))
    phases = {}
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        with record_function("decode"):
            imgs = [r.load() for r in preprocess.as_refs(paths)]
        phases["decode_s"] = time.perf_counter() - t
        t = time.perf_counter()
        with record_function("preprocess"):
            pixels = preprocess.pixel_values_for(imgs, torch.device("cpu"), torch.float32)
        phases["preprocess_s"] = time.perf_counter() - t
        t = time.perf_counter()
        with record_function("text"):
            scorer.encode_prompts([C.PROMPT])
        phases["text_s"] = time.perf_counter() - t
        t = time.perf_counter()
        with record_function("vision"), torch.inference_mode():
            ict = scorer.modules.ict
            ict.visual_projection(ict.vision_model(pixel_values=pixels).pooler_output)
        phases["vision_s"] = time.perf_counter() - t
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25)
    (OUT / "profile_ops.txt").write_text(table)
    return dict(side="profile", **phases)


def _config_arg(args):
    return args.work / "config.json" if args.tiny else None


CHILDREN = {"ref": child_ref, "proj": child_proj, "cached": child_cached, "profile": child_profile}


# -------------------------------------------------------------------------------------------------------- parent
def _child_args(args, kind: str, **extra) -> list[str]:
    a = ["--child", kind, "--work", str(args.work), "--floor-repeats", str(args.floor_repeats)]
    if args.tiny:
        a.append("--tiny")
    if extra.get("hp"):
        a.append("--hp")
    if extra.get("cache_dir"):
        a += ["--cache-dir", str(extra["cache_dir"])]
    return a


def parity(ref: dict, proj: dict) -> dict:
    """max |diff| of ICT (and HP, ICT*HP) between the two sides; same best image and same full ranking."""
    def order(xs):
        return sorted(range(len(xs)), key=lambda i: -xs[i])

    out = {"ict_max_abs_diff": max(abs(a - b) for a, b in zip(ref["ict"], proj["ict"])),
           "ict_same_ranking": order(ref["ict"]) == order(proj["ict"]), "ict_same_best": ref["best"] == proj["best"]}
    if "hp" in ref and "hp" in proj:
        out.update(
            hp_ict_max_abs_diff=max(abs(a - b) for a, b in zip(ref["hp_ict"], proj["hp_ict"])),
            hp_max_abs_diff=max(abs(a - b) for a, b in zip(ref["hp"], proj["hp"])),
            hp_raw_max_abs_diff=max(abs(a - b) for a, b in zip(ref["hp_raw"], proj["hp_raw"])),
            combined_max_abs_diff=max(abs(a - b) for a, b in zip(ref["combined"], proj["combined"])),
            combined_same_ranking=order(ref["combined"]) == order(proj["combined"]),
            hp_same_best=ref["hp_best"] == proj["hp_best"])
    spread = sorted(ref["ict"])
    out["ict_min_gap"] = min(b - a for a, b in zip(spread, spread[1:])) if len(spread) > 1 else None
    return out


def summarise(rounds: list[dict]) -> dict:
    def col(kind, key):
        return [r[kind].get(key) for r in rounds if kind in r]

    s: dict = {}
    for key in ("load_s", "score_s", "hp_load_s", "hp_score_s", "peak_rss_bytes", "rss_ict_bytes",
                "process_wall_s"):
        for kind in ("ref", "proj"):
            s[f"{kind}.{key}"] = C.median(col(kind, key))
        s[f"ratio.{key}"] = C.median(C.pair_ratios(col("ref", key), col("proj", key)))
    # total user-visible time for one best-of-8: load + score
    for kind in ("ref", "proj"):
        s[f"{kind}.total_s"] = C.median([r[kind]["load_s"] + r[kind]["score_s"] for r in rounds])
        s[f"{kind}.hp_total_s"] = C.median([r[kind]["hp_load_s"] + r[kind]["hp_score_s"] for r in rounds
                                            if "hp_load_s" in r[kind]])
    s["ratio.total_s"] = C.median([(r["ref"]["load_s"] + r["ref"]["score_s"]) /
                                   (r["proj"]["load_s"] + r["proj"]["score_s"]) for r in rounds])
    s["ratio.hp_total_s"] = C.median([(r["ref"]["hp_load_s"] + r["ref"]["hp_score_s"]) /
                                      (r["proj"]["hp_load_s"] + r["proj"]["hp_score_s"]) for r in rounds
                                      if "hp_load_s" in r["ref"]])
    s["rss_ratio.proj_over_ref"] = C.median(C.pair_ratios(col("proj", "rss_ict_bytes"), col("ref", "rss_ict_bytes")))
    s["rss_ratio.hp_proj_over_ref"] = C.median(C.pair_ratios(col("proj", "peak_rss_bytes"),
                                                             col("ref", "peak_rss_bytes")))
    s["floor.forward_s"] = C.median(col("cached", "floor_s"))
    s["cached.score_s"] = C.median(col("cached", "score_s"))
    s["cached.load_s"] = C.median(col("cached", "load_s"))
    s["ratio.proj_over_floor"] = C.median(C.pair_ratios(col("proj", "score_s"), col("cached", "floor_s")))
    s["ratio.cached_over_floor"] = C.median(C.pair_ratios(col("cached", "score_s"), col("cached", "floor_s")))
    s["ratio.ref_over_cached"] = C.median(C.pair_ratios(col("ref", "score_s"), col("cached", "score_s")))
    s["cached.warm_score_s"] = C.median(col("cached", "warm_score_s"))
    s["ratio.warm_over_floor"] = C.median(C.pair_ratios(col("cached", "warm_score_s"), col("cached", "floor_s")))
    s["cached.hit_p50_ms"] = C.median(col("cached", "hit_p50_ms"))
    s["cached.hit_p95_ms"] = C.median(col("cached", "hit_p95_ms"))
    par = [r["parity"] for r in rounds]
    s["parity.ict_max_abs_diff"] = max(p["ict_max_abs_diff"] for p in par)
    s["parity.ict_same_ranking"] = all(p["ict_same_ranking"] for p in par)
    if all("combined_max_abs_diff" in p for p in par):
        for k in ("hp_ict_max_abs_diff", "hp_max_abs_diff", "hp_raw_max_abs_diff", "combined_max_abs_diff"):
            s[f"parity.{k}"] = max(p[k] for p in par)
        s["parity.combined_same_ranking"] = all(p["combined_same_ranking"] for p in par)
    s["parity.ict_min_gap"] = min(p["ict_min_gap"] for p in par)
    s["targets"] = {
        "load >= 5x faster": s["ratio.load_s"] >= 5,
        "peak RSS <= 0.7x": s["rss_ratio.proj_over_ref"] <= 0.7,
        "best-of-8 >= 1.8x faster": s["ratio.score_s"] >= 1.8,
        "end to end <= 1.10x floor (prompt not cached)": s["ratio.proj_over_floor"] <= 1.10,
        "end to end <= 1.10x floor (prompt cached)": s["ratio.cached_over_floor"] <= 1.10,
        "parity |diff| <= 1e-4, same ranking": s["parity.ict_max_abs_diff"] <= 1e-4 and s["parity.ict_same_ranking"]
        and s.get("parity.combined_max_abs_diff", 0) <= 1e-4 and s.get("parity.combined_same_ranking", True),
    }
    return s


def run_bench(args) -> dict:
    C.ensure_work(args.work, tiny=args.tiny, gain=args.gain)
    OUT.mkdir(parents=True, exist_ok=True)
    script = Path(__file__).resolve()
    started = dt.datetime.now().astimezone()
    rounds = []
    for r in range(args.rounds):
        cache_dir = args.work / "caches" / f"round{r}"
        for d in (cache_dir, Path(str(cache_dir) + "-hp")):
            shutil.rmtree(d, ignore_errors=True)
        rnd: dict = {"git": _git_state()}
        rnd["ref"] = C.run_child(script, _child_args(args, "ref", hp=True), OUT / "child.json")
        log.info("round %d ref: load %.1f s, best-of-8 %.1f s, ICT+HP %.1f s, peak %.2f GB", r,
                 rnd["ref"]["load_s"], rnd["ref"]["score_s"], rnd["ref"]["hp_score_s"],
                 rnd["ref"]["peak_rss_bytes"] / 1e9)
        rnd["proj"] = C.run_child(script, _child_args(args, "proj", hp=True, cache_dir=cache_dir), OUT / "child.json")
        log.info("round %d proj: load %.1f s, best-of-8 %.1f s, ICT+HP %.1f s, peak %.2f GB", r,
                 rnd["proj"]["load_s"], rnd["proj"]["score_s"], rnd["proj"]["hp_score_s"],
                 rnd["proj"]["peak_rss_bytes"] / 1e9)
        rnd["cached"] = C.run_child(script, _child_args(args, "cached", cache_dir=cache_dir), OUT / "child.json")
        log.info("round %d cached: best-of-8 %.1f s, floor %.1f s, hit p50 %.3f ms", r, rnd["cached"]["score_s"],
                 rnd["cached"]["floor_s"], rnd["cached"]["hit_p50_ms"])
        rnd["parity"] = parity(rnd["ref"], rnd["proj"])
        log.info("round %d parity: %s", r, rnd["parity"])
        rounds.append(rnd)
        _save(args, started, rounds, None, partial=True)
    cache_bench = None
    if not args.skip_cache_bench:
        cmd = [sys.executable, str(HERE / "bench_cache.py")] + (["--images", "2000", "--repeats", "200"]
                                                               if args.tiny else [])
        log.info("running %s", " ".join(cmd[1:]))
        t = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        cache_bench = {"command": " ".join(["python", "bench/bench_cache.py"] + cmd[2:]), "stdout": res.stdout,
                       "wall_s": time.perf_counter() - t}
    return _save(args, started, rounds, cache_bench, partial=False)


def _git_state() -> dict:
    """The commit measured, and whether ict_core/ differed from it (a run must not mix code versions)."""
    def git(*a):
        try:
            return subprocess.run(["git", *a], cwd=C.ROOT, capture_output=True, text=True, timeout=20).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return None
    return {"commit": git("rev-parse", "--short", "HEAD"),
            "ict_core_dirty": bool(git("status", "--porcelain", "ict_core"))}


def _save(args, started, rounds, cache_bench, partial: bool) -> dict:
    data = {
        "bench": "cpu", "tiny": args.tiny, "partial": partial, "started": started.isoformat(timespec="seconds"),
        "finished": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": "python bench/bench_cpu.py " + " ".join(sys.argv[1:]), "machine": C.machine(),
        "git": _git_state(), "work": str(args.work), "manifest": json.loads((args.work / "manifest.json").read_text()),
        "prompt": C.PROMPT, "rounds": rounds, "summary": summarise(rounds) if rounds else None,
        "cache_bench": cache_bench,
    }
    path = OUT / ("cpu-tiny.json" if args.tiny else "cpu.json")
    path.write_text(json.dumps(data, indent=1, default=str))
    log.info("wrote %s", path)
    return data


# -------------------------------------------------------------------------------------------------------- render
def _f(x, nd=1, suffix=""):
    return "n/a" if x is None else f"{x:.{nd}f}{suffix}"


def _x(x, nd=2):
    return "n/a" if x is None else f"{x:.{nd}f}x"


def render_cpu(data: dict) -> str:
    s, rounds, m = data["summary"], data["rounds"], data["machine"]
    gb = 1e9
    lines = [
        f"Measured {data['started']} to {data['finished']} on {m.get('cpu', '?')}, {m['cpus']} CPUs, "
        f"{m.get('mem_total_gb', '?')} GB RAM, {m['platform']}; Python {m['python']}, torch {m.get('torch')}, "
        f"transformers {m.get('transformers')}, {m.get('torch_threads')} torch threads. "
        f"{len(rounds)} rounds (A = reference, B = ict_core, alternating), each run a fresh process; "
        f"ratios are taken pair by pair (same round), then the median. Weights: random, at "
        f"{'TINY smoke-test shapes (not a benchmark)' if data['tiny'] else 'ViT-H-14 shapes'}, "
        f"in the released layouts (ICT .bin "
        f"{data['manifest']['sizes_bytes']['ICT/pytorch_model.bin'] / gb:.2f} GB bf16, "
        f"HP backbone .bin {data['manifest']['sizes_bytes']['HP/hp_backbone/pytorch_model.bin'] / gb:.2f} GB fp32); "
        f"8 images of 512-1024 px; one prompt; fp32 everywhere. Files are in the page cache for both sides "
        f"(\"cold\" = fresh process, not a cold disk).",
        "",
        f"Command: `{data['command']}`; ict_core at commit {(data.get('git') or {}).get('commit', '?')}"
        f"{' with local changes' if (data.get('git') or {}).get('ict_core_dirty') else ''}, per round: "
        f"{', '.join(str((r.get('git') or {}).get('commit', '?')) for r in rounds)}.",
        "",
        "| figure (median of runs) | model card loop (A) | ict_core (B) | A / B pair by pair |",
        "|---|---:|---:|---:|",
        f"| cold load, ICT (s) | {_f(s['ref.load_s'])} | {_f(s['proj.load_s'], 2)} | {_x(s['ratio.load_s'], 1)} |",
        f"| peak RSS, ICT best-of-8 (GB) | {_f(s['ref.rss_ict_bytes'] / gb, 2)} | "
        f"{_f(s['proj.rss_ict_bytes'] / gb, 2)} "
        f"| B/A = {_f(s['rss_ratio.proj_over_ref'], 2)} |",
        f"| best-of-8, one prompt, end to end after load (s) | {_f(s['ref.score_s'])} | {_f(s['proj.score_s'])} "
        f"| {_x(s['ratio.score_s'], 2)} |",
        f"| best-of-8 incl. cold load (s) | {_f(s['ref.total_s'])} | {_f(s['proj.total_s'])} | "
        f"{_x(s['ratio.total_s'], 2)} |",
        f"| best-of-8, prompt cached (warmed in a prior run) (s) | {_f(s['ref.score_s'])} (no cache) | "
        f"{_f(s['cached.score_s'])} | {_x(s['ratio.ref_over_cached'], 2)} |",
        f"| cold load, ICT+HP (s) | {_f(s['ref.hp_load_s'])} | {_f(s['proj.hp_load_s'], 2)} | "
        f"{_x(s['ratio.hp_load_s'], 1)} |",
        f"| best-of-8 ICT+HP, after load (s) | {_f(s['ref.hp_score_s'])} | {_f(s['proj.hp_score_s'])} "
        f"| {_x(s['ratio.hp_score_s'], 2)} |",
        f"| best-of-8 ICT+HP incl. load (s) | {_f(s['ref.hp_total_s'])} | {_f(s['proj.hp_total_s'])} "
        f"| {_x(s['ratio.hp_total_s'], 2)} |",
        f"| peak RSS of the whole run, ICT+HP (GB) | {_f(s['ref.peak_rss_bytes'] / gb, 2)} | "
        f"{_f(s['proj.peak_rss_bytes'] / gb, 2)} | B/A = {_f(s['rss_ratio.hp_proj_over_ref'], 2)} |",
        "",
        "| floor and cache | value |",
        "|---|---:|",
        "| floor: one bare batched fp32 vision forward of the 8 images (s; C's process, after its best-of-8) | "
        f"{_f(s['floor.forward_s'])} |",
        f"| ict_core best-of-8 / floor, prompt not cached (pair by pair) | {_x(s['ratio.proj_over_floor'], 3)} |",
        f"| ict_core best-of-8 / floor, prompt cached (pair by pair) | {_x(s['ratio.cached_over_floor'], 3)} |",
        f"| ict_core best-of-8 run again in C's process after the floor (warm, prompt cached) / floor "
        f"({sum(1 for r in rounds if 'warm_score_s' in r.get('cached', {}))} rounds) | "
        f"{_x(s.get('ratio.warm_over_floor'), 3)} |",
        f"| prompt-cache hit through Scorer.encode_prompts, p50 / p95 (ms) | {_f(s['cached.hit_p50_ms'], 3)} / "
        f"{_f(s['cached.hit_p95_ms'], 3)} |",
        "",
        "Parity at ViT-H shapes (same runs, same images, same weights; reference fp32 per image, "
        "ict_core fp32 batched):",
        "",
        "| quantity | max abs diff over all rounds | same ranking |",
        "|---|---:|---|",
        f"| ICT cosine | {s['parity.ict_max_abs_diff']:.2e} | {s['parity.ict_same_ranking']} |",
    ]
    if "parity.combined_max_abs_diff" in s:
        lines += [
            f"| ICT cosine (ICT+HP run) | {s['parity.hp_ict_max_abs_diff']:.2e} | |",
            f"| HP raw head output | {s['parity.hp_raw_max_abs_diff']:.2e} | |",
            f"| HP sigmoid | {s['parity.hp_max_abs_diff']:.2e} | |",
            f"| ICT x HP | {s['parity.combined_max_abs_diff']:.2e} | {s['parity.combined_same_ranking']} |",
        ]
    lines += ["", f"Smallest gap between two reference ICT scores: {s['parity.ict_min_gap']:.2e} "
                  f"(the ranking check is meaningful when it exceeds the max diff).", "",
              "Per-round raw figures (s; RSS in GB):", "",
              "| round | A load | B load | A best-of-8 | B best-of-8 | floor | B cached | A ICT+HP | B ICT+HP "
              "| A peak | B peak |",
              "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for i, r in enumerate(rounds):
        a, b = r["ref"], r["proj"]
        lines.append(f"| {i} | {a['load_s']:.1f} | {b['load_s']:.2f} | {a['score_s']:.1f} | {b['score_s']:.1f} | "
                     f"{r['cached']['floor_s']:.1f} | {r['cached']['score_s']:.1f} | {a['hp_score_s']:.1f} | "
                     f"{b['hp_score_s']:.1f} | {a['peak_rss_bytes'] / gb:.2f} | {b['peak_rss_bytes'] / gb:.2f} |")
    lines += ["", "Targets on this machine:", ""]
    lines += [f"- {k}: **{'met' if v else 'missed'}**" for k, v in s["targets"].items()]
    if data.get("cache_bench"):
        cb = data["cache_bench"]
        lines += ["", f"Embedding cache (`{cb['command']}`, run right after the rounds):", "",
                  cb["stdout"].strip()]
    return "\n".join(lines)


def render(args) -> None:
    src = OUT / ("cpu-tiny.json" if args.tiny else "cpu.json")
    data = json.loads(src.read_text())
    data["summary"] = summarise(data["rounds"])  # always from the raw runs
    block = render_cpu(data)
    doc = args.doc
    text = doc.read_text() if doc.exists() else "<!-- cpu:begin -->\n<!-- cpu:end -->\n"
    begin, end = "<!-- cpu:begin -->", "<!-- cpu:end -->"
    if begin not in text or end not in text:
        raise SystemExit(f"{doc} has no {begin} ... {end} markers")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    doc.write_text(f"{head}{begin}\n{block}\n{end}{tail}")
    log.info("rendered %s into %s", src, doc)


# ---------------------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=None, help=f"work folder (default {C.DEFAULT_WORK}, "
                                                            f"or {C.DEFAULT_WORK}-tiny with --tiny)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tiny", action="store_true", help="tiny CLIP config: a smoke test of the script, not a benchmark")
    ap.add_argument("--gain", type=float, default=1.0, help=argparse.SUPPRESS)
    ap.add_argument("--floor-repeats", type=int, default=1)
    ap.add_argument("--skip-cache-bench", action="store_true")
    ap.add_argument("--render", action="store_true", help="only rewrite docs/BENCHMARKS.md from bench/out/")
    ap.add_argument("--doc", type=Path, default=DOC)
    ap.add_argument("--profile", action="store_true", help="one ict_core best-of-8 under torch.profiler")
    ap.add_argument("--verbose", action="store_true")
    # child-only
    ap.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    ap.add_argument("--hp", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--cache-dir", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.work is None:
        args.work = Path(str(C.DEFAULT_WORK) + ("-tiny" if args.tiny else ""))
    C.setup_logging(args.verbose)
    if args.child:
        res = CHILDREN[args.child](args)
        args.result.write_text(json.dumps({**res, "peak_rss_bytes": C.maxrss_bytes()}))
        return 0
    if args.render:
        render(args)
        return 0
    if args.profile:
        C.ensure_work(args.work, tiny=args.tiny, gain=args.gain)
        OUT.mkdir(parents=True, exist_ok=True)
        res = C.run_child(Path(__file__).resolve(), _child_args(args, "profile"), OUT / "child.json")
        print(json.dumps({k: v for k, v in res.items() if k != "side"}, indent=1))
        print((OUT / "profile_ops.txt").read_text())
        return 0
    data = run_bench(args)
    print(render_cpu(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
