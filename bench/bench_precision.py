"""Opt-in bf16 on a CPU with native bf16 (AVX512-BF16/AMX) against the default fp32, side by side.

Why: fp32 is the default because it gives the official scores; `--precision bf16` trades ~3 digits of
the cosine for speed. This measures both sides of that trade on the same weights and images: the
best-of-8 time (model loaded, prompt encoded each time, as `Scorer.score` does without a cache) and
how far the scores and the ranking move.

    python bench/bench_precision.py              # ViT-H-14 work folder of bench_cpu.py, 3 rounds
    python bench/bench_precision.py --tiny       # smoke test with the tiny CLIP

Both scorers live in one process and alternate (fp32, bf16, fp32, bf16, ...); ratios are taken per
round, medians quoted. Prints a markdown table.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import _common as C  # noqa: E402

log = logging.getLogger("bench.precision")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=C.DEFAULT_WORK)
    ap.add_argument("--tiny", action="store_true", help="tiny CLIP (smoke test of the script)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args(argv)
    C.setup_logging()
    work = args.work if not args.tiny else args.work.with_name(args.work.name + "-tiny")
    C.ensure_work(work, tiny=args.tiny)
    import torch

    from ict_core.scorer import Scorer, cpu_runs_bf16

    if not cpu_runs_bf16():
        raise SystemExit("this CPU has no native bf16 (AVX512-BF16/AMX): ict_core scores in fp32 here")
    images = C.image_paths(work)
    scorers = {p: Scorer.load(work / "ict.safetensors", device="cpu", precision=p) for p in ("fp32", "bf16")}
    assert scorers["bf16"].dtype == torch.bfloat16
    times = {p: [] for p in scorers}
    results = {}
    for p, s in scorers.items():  # warm-up: first-call costs (oneDNN kernels) are not the steady state
        results[p] = s.score(images, C.PROMPT)
    for r in range(args.rounds):
        for p, s in scorers.items():
            t = time.perf_counter()
            results[p] = s.score(images, C.PROMPT)
            times[p].append(time.perf_counter() - t)
            log.info("round %d %s: best-of-8 %.2f s", r, p, times[p][-1])
    ict32 = [x.ict for x in results["fp32"]]
    ict16 = [x.ict for x in results["bf16"]]
    diff = max(abs(a - b) for a, b in zip(ict32, ict16))
    order32 = sorted(range(len(ict32)), key=lambda i: -ict32[i])
    order16 = sorted(range(len(ict16)), key=lambda i: -ict16[i])
    ratios = C.pair_ratios(times["fp32"], times["bf16"])
    info = C.machine()
    print(f"\nPrecision on the CPU: {info.get('cpu', '?')}, {info['cpus']} CPU(s), torch {info.get('torch')}, "
          f"{'tiny CLIP' if args.tiny else 'ViT-H-14'}, {len(images)} images, {args.rounds} rounds\n")
    print("| | fp32 (default) | bf16 (opt-in) |")
    print("|---|---:|---:|")
    print(f"| best-of-8 after load, median (s) | {C.median(times['fp32']):.2f} | {C.median(times['bf16']):.2f} |")
    print(f"| per round (s) | {', '.join(f'{t:.2f}' for t in times['fp32'])} | "
          f"{', '.join(f'{t:.2f}' for t in times['bf16'])} |")
    print(f"| speed-up, median of per-round ratios | | {C.median(ratios):.2f}x |")
    print(f"| max abs difference of the ICT cosine | | {diff:.2e} |")
    print(f"| ranking of the 8 images | {order32} | {order16} ({'same' if order16 == order32 else 'differs'}) |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
