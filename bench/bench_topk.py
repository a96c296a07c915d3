"""Cost of `ict search --top-k K` for a K far above the gallery size: wall time and peak RSS of one search.

    python bench/bench_topk.py [--root WORKTREE] [--rows 20000] [--k 10 1000000 10000000]

Each K runs in a fresh process (peak RSS is per process) on a synthetic gallery of unit 1024-d vectors that
is built once in --work; --root picks the ict_core to measure (a worktree of another commit to compare).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def child(a) -> None:
    sys.path.insert(0, a.root)
    import numpy as np

    from ict_core.cache import EmbeddingCache

    cache, k = EmbeddingCache(a.work), a.k[0]
    if k == 0:  # the build: the gallery and its IVF index, once per --work
        rng = np.random.default_rng(0)
        v = rng.normal(size=(a.rows, 1024)).astype(np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        cache.put_images("bench", {f"h{i}": (x, 0.0, f"{i}.png") for i, x in enumerate(v)})
        cache.flush(force=True)
        cache.search("bench", v[0], top_k=10)
        return
    q = np.random.default_rng(1).normal(size=1024).astype(np.float32)
    q /= np.linalg.norm(q)
    t = time.perf_counter()
    try:
        n, error = len(cache.search("bench", q, top_k=k)), None
    except Exception as e:  # what the old code did with a huge k
        n, error = None, f"{type(e).__name__}: {str(e)[:80]}"
    wall = time.perf_counter() - t
    print(json.dumps({"k": k, "rows": n, "s": round(wall, 4), "error": error,
                      "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", default=str(HERE.parent))
    ap.add_argument("--rows", type=int, default=20_000)
    ap.add_argument("--k", type=int, nargs="+", default=[10, 1_000_000, 10_000_000])
    ap.add_argument("--work", default="/tmp/ict-bench-topk")
    ap.add_argument("--child", action="store_true")
    a = ap.parse_args()
    if a.child:
        child(a)
        return 0
    env = dict(os.environ, ICT_CACHE_NO_FAISS="")
    for k in [0, *a.k]:
        out = subprocess.run([sys.executable, __file__, "--child", "--root", a.root, "--rows", str(a.rows), "--k",
                              str(k), "--work", a.work], capture_output=True, text=True, env=env)
        if k:
            print(out.stdout.strip() or out.stderr.strip().splitlines()[-1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
