"""Embedding-cache benchmark: prompt-hit latency and gallery search over random unit vectors.

Why: a prompt hit replaces a text-tower forward (~2.8 s on a 2-core CPU for ViT-H) and a gallery
search replaces one image-tower forward per image; these numbers show what the cache costs instead.

    python bench/bench_cache.py                 # 1,000 prompts; 100,000 images, width 1024
    python bench/bench_cache.py --images 20000  # smaller gallery

Prints a markdown table (paste into docs/BENCHMARKS.md). Uses a temporary folder unless --cache-dir.
"""
from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _light_import():
    """Load ict_core.cache without ict_core/__init__ (which imports torch): the cache alone is measured."""
    import types

    if "ict_core" not in sys.modules:
        pkg = types.ModuleType("ict_core")
        pkg.__path__ = [str(Path(__file__).resolve().parents[1] / "ict_core")]
        sys.modules["ict_core"] = pkg
    from ict_core import cache

    return cache


def unit_rows(rng, n, d, chunk=10_000):
    out = np.empty((n, d), np.float32)
    for s in range(0, n, chunk):
        v = rng.standard_normal((min(chunk, n - s), d), dtype=np.float32)
        out[s:s + len(v)] = v / np.linalg.norm(v, axis=1, keepdims=True)
    return out


def percentiles(samples):
    a = np.asarray(samples) * 1e3
    return float(np.percentile(a, 50)), float(np.percentile(a, 95))


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=1000, help="prompts stored before measuring hits")
    ap.add_argument("--images", type=int, default=100_000, help="gallery size")
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=2000, help="prompt lookups timed")
    ap.add_argument("--searches", type=int, default=30, help="searches timed per row")
    ap.add_argument("--cache-dir", help="folder to use (default: a temporary one)")
    args = ap.parse_args(argv)
    cache_mod = _light_import()
    rng = np.random.default_rng(0)
    rows = []

    def row(what, p50, p95=None, note=""):
        rows.append((what, p50, p95, note))

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.cache_dir or tmp)
        fp = "bench0000000000000000000"
        # ---- prompts
        pvec = unit_rows(rng, args.prompts, args.dim)
        prompts = {f"prompt number {i}: a photo of something" : pvec[i] for i in range(args.prompts)}
        names = list(prompts)
        c = cache_mod.EmbeddingCache(folder)
        dt, _ = timed(lambda: c.put_prompts(fp, prompts))
        row(f"put {args.prompts:,} prompts (memory)", dt * 1e3)
        dt, _ = timed(c.flush)
        size = os.path.getsize(next((folder / "prompts").glob("*.ictc")))
        row(f"flush {args.prompts:,} prompts to disk", dt * 1e3, note=f"file {size / 1e6:.1f} MB")
        dt, _ = timed(c.flush)
        row("flush when clean", dt * 1e3)
        c2 = cache_mod.EmbeddingCache(folder)
        dt, got = timed(lambda: c2.get_prompts(fp, [names[0]]))
        assert got[names[0]].tobytes() == prompts[names[0]].tobytes()
        row("first hit in a new process (loads the file)", dt * 1e3)
        samples = []
        order = rng.integers(0, args.prompts, args.repeats)
        for i in order:
            t = time.perf_counter()
            c2.get_prompts(fp, [names[i]])
            samples.append(time.perf_counter() - t)
        row("prompt hit, 1 prompt", *percentiles(samples), f"{args.repeats} lookups")
        samples = []
        for _ in range(200):
            t = time.perf_counter()
            c2.get_prompts(fp, ["never stored prompt"])
            samples.append(time.perf_counter() - t)
        row("prompt miss, 1 prompt", *percentiles(samples))

        # ---- gallery
        n, d = args.images, args.dim
        gvec = unit_rows(rng, n, d)
        hp = rng.normal(0, 1.5, n).astype(np.float32)
        gkey = cache_mod.gallery_key(fp, "hpbench0000000000000000")
        entries = {f"{i:064x}": (gvec[i], float(hp[i]), f"/images/{i:06d}.png") for i in range(n)}
        g = cache_mod.EmbeddingCache(folder)
        dt, _ = timed(lambda: g.put_images(gkey, entries))
        row(f"put {n:,} images (memory)", dt * 1e3)
        del entries
        dt, _ = timed(g.flush)
        size = os.path.getsize(next((folder / "images").glob("*.ictc")))
        row(f"flush {n:,} images to disk", dt * 1e3, note=f"file {size / 1e6:.0f} MB")
        g2 = cache_mod.EmbeddingCache(folder)
        dt, count = timed(lambda: g2.image_count(gkey))
        assert count == n
        row(f"load {n:,}-image gallery (checksum + parse)", dt * 1e3)
        queries = unit_rows(rng, args.searches + 2, d)
        faiss_on = cache_mod._faiss() is not None
        for by in ("ict", "ict*hp"):  # a fresh table scans in fp32 once, codes itself at the second search
            dt, _ = timed(lambda: g2.search(gkey, queries[-1], top_k=10, by=by))
            row(f"first top-10 search by {by} in a new process (fp32 scan)", dt * 1e3)
            if faiss_on:
                dt, _ = timed(lambda: g2.search(gkey, queries[-2], top_k=10, by=by))
                row(f"second top-10 search by {by} (codes the {'rows' if by == 'ict' else 'hp-scaled rows'})",
                    dt * 1e3)
        for label, kw in (("search top 10, by ict", dict(top_k=10)),
                          ("search top 10, by ict*hp", dict(top_k=10, by="ict*hp")),
                          ("search all, by ict", dict()),
                          ("search all, by ict*hp", dict(by="ict*hp"))):
            samples = []
            for q in queries[: args.searches]:
                t = time.perf_counter()
                hits = g2.search(gkey, q, **kw)
                samples.append(time.perf_counter() - t)
            row(f"{label} ({n:,} x {d})", *percentiles(samples), f"{len(hits):,} results")
        # same searches without faiss, for comparison
        os.environ[cache_mod.NO_FAISS_ENV] = "1"
        try:
            samples = []
            for q in queries[: args.searches]:
                t = time.perf_counter()
                g2.search(gkey, q, top_k=10)
                samples.append(time.perf_counter() - t)
            row(f"numpy fallback, top 10 ({n:,} x {d})", *percentiles(samples))
        finally:
            os.environ.pop(cache_mod.NO_FAISS_ENV, None)

    print(f"\nEmbedding cache, {platform.processor() or platform.machine()}, {os.cpu_count()} CPU(s), "
          f"numpy {np.__version__}, faiss {_faiss_version(cache_mod)}\n")
    print("| operation | p50 / time (ms) | p95 (ms) | note |")
    print("|---|---:|---:|---|")
    for what, p50, p95, note in rows:
        print(f"| {what} | {p50:.3f} | {'' if p95 is None else f'{p95:.3f}'} | {note} |")
    return 0


def _faiss_version(cache_mod) -> str:
    mod = cache_mod._faiss()
    return getattr(mod, "__version__", "?") if mod is not None else "not installed"


if __name__ == "__main__":
    sys.exit(main())
