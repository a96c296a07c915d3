"""Embedding-cache benchmark: this tree's cache against another commit's, side by side.

Why: the cache must stay an accelerator (a prompt hit far below a text forward; indexing bound by the
image tower) and search galleries of a million images on a 2-core CPU. Each figure comes from a fresh
process; the two implementations alternate round by round (run under `flock /work/bench.lock`).

    python bench/bench_cache.py --old-root /work/wt/cache-old --sizes 100000 1000000 --old-sizes 100000

Synthetic galleries (never all in RAM: generated in chunks): unit 1024-d vectors drawn around CLUSTERS
random centres (cosine ~0.7 to the centre, like many takes of a few prompts), queries drawn the same way;
`--uniform` draws i.i.d. uniform directions instead (no structure: the worst case of an IVF index).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import machine, median, run_child  # noqa: E402

CLUSTERS, NOISE, DIM, CHUNK = 2000, 1.0, 1024, 10_000
PROMPT = "a red fox standing in fresh snow at sunrise"


def unit(rng, n, d=DIM):
    v = rng.standard_normal((n, d), dtype=np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def rows(start, stop, seed, uniform):
    """Rows [start, stop) of the synthetic set `seed`, the same whatever the chunking."""
    centers = unit(np.random.default_rng(12345), CLUSTERS)
    out = []
    for s in range(start - start % CHUNK, stop, CHUNK):
        rng = np.random.default_rng([seed, s])
        v = unit(rng, CHUNK) if uniform else centers[rng.integers(0, CLUSTERS, CHUNK)] + NOISE * unit(rng, CHUNK)
        out.append((v / np.linalg.norm(v, axis=1, keepdims=True))[max(0, start - s): stop - s])
    return np.concatenate(out).astype(np.float32)


def load(root):
    root = Path(root).resolve()
    sys.path.insert(0, str(root))
    for name in [m for m in sys.modules if m == "ict_core" or m.startswith("ict_core.")]:
        del sys.modules[name]  # _common imported this tree's
    import ict_core.cache as cache  # noqa: PLC0415

    assert Path(cache.__file__).is_relative_to(root), cache.__file__

    return cache


def p50(fn, times):
    samples = []
    for i in range(times):
        t = time.perf_counter()
        fn(i)
        samples.append(time.perf_counter() - t)
    return float(np.median(samples)) * 1e3


# ------------------------------------------------------------------------------------------------ children
def child_build(a, cache):
    c, t = cache.EmbeddingCache(a.dir, max_images=10 ** 7), time.perf_counter()
    for s in range(0, a.n, CHUNK):
        v = rows(s, min(a.n, s + CHUNK), 0, a.uniform)
        c.put_images(a.key, {f"{i:064x}": (v[i - s], 0.5, f"/g/{i:07d}.png") for i in range(s, s + len(v))})
        c.flush()
    stored = time.perf_counter() - t
    c.put_prompts(a.prompt_key, {PROMPT: rows(0, 1, 1, a.uniform)[0]})
    c.flush()
    t = time.perf_counter()
    c.search(a.key, rows(0, 1, 2, a.uniform)[0], top_k=10)  # the new cache builds its IVF index here
    return {"store_s": stored, "first_search_s": time.perf_counter() - t,
            "disk_bytes": sum(f.stat().st_size for f in Path(a.dir).rglob("*") if f.is_file())}


def child_search(a, cache):
    q = rows(0, a.queries, 3, a.uniform)
    t = time.perf_counter()
    c = cache.EmbeddingCache(a.dir, max_images=10 ** 7)
    first = c.search(a.key, q[0], top_k=10)
    out = {"fresh_first_search_s": time.perf_counter() - t}
    fast = []
    out["top10_p50_ms"] = p50(lambda i: fast.append(c.search(a.key, q[i], top_k=10)), a.queries)
    if a.exact:
        exact = []
        kw = {"exact": True}
        out["exact_top10_p50_ms"] = p50(lambda i: exact.append(c.search(a.key, q[i], top_k=10, **kw)), a.exact)
        out["recall_at_10"] = float(np.mean([len({h.hash for h in f} & {h.hash for h in e}) / 10
                                             for f, e in zip(fast, exact)]))
        out["values_exact"] = all(h.ict == g.ict for f, e in zip(fast, exact) for h in f for g in e if h.hash == g.hash)
    del first
    return out


def child_prompt(a, cache):
    c = cache.EmbeddingCache(a.dir)
    v = rows(0, 1000, 4, False)
    c.put_prompts("bench" * 5, {f"prompt {i}": v[i] for i in range(1000)})
    c.flush()
    c = cache.EmbeddingCache(a.dir)
    return {"prompt_hit_p50_ms": p50(lambda i: c.get_prompts("bench" * 5, [f"prompt {i % 1000}"]), a.repeats)}


def child_index_cost(a, cache):
    """What `ict index` spends in the cache per image: hash ~1 MB of file bytes, look the hash up,
    store the features, save (rounds of 64, in the big gallery's database)."""
    c = cache.EmbeddingCache(a.dir, max_images=10 ** 7)
    blob, v = os.urandom(1 << 20), rows(0, 64, 5, False)
    t = time.perf_counter()
    for r in range(a.rounds):
        digests = [hashlib.sha256(blob + bytes([r, i])).hexdigest() for i in range(64)]
        c.get_images(a.key + "+new", digests)  # a gallery of its own in the same database: reruns stay alike
        c.put_images(a.key + "+new", {d: (v[i], 0.5, f"/new/{r}-{i}.png") for i, d in enumerate(digests)})
        c.flush()
    return {"cache_ms_per_image": (time.perf_counter() - t) / (64 * a.rounds) * 1e3}


# ------------------------------------------------------------------------------------------------ driver
def tiny_model(work: Path) -> Path:
    """A converted tiny ICT file: `ict search` needs a model file for its keys (the prompt is cached)."""
    path = work / "tiny-ict.safetensors"
    if not path.exists():
        sys.path.insert(0, str(HERE.parent / "tests"))
        from conftest import TinyModels  # noqa: PLC0415

        (work / "tiny").mkdir(exist_ok=True)
        shutil.copy(TinyModels(work / "tiny").ict, path)
    return path


def keys(root: Path, model: Path) -> tuple[str, str]:
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from ict_core.weights import fingerprint; "
            "from ict_core.cache import gallery_key, prompt_key; fp = fingerprint(sys.argv[2]); "
            "print(gallery_key(fp, None), prompt_key(fp))")
    return tuple(subprocess.run([sys.executable, "-c", code, str(root), str(model)], capture_output=True, text=True,
                                check=True).stdout.split())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", choices=("build", "search", "prompt", "index_cost"))
    ap.add_argument("--root", default=str(HERE.parent))
    ap.add_argument("--old-root", help="a worktree of the commit to compare with")
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000])
    ap.add_argument("--old-sizes", type=int, nargs="+", help="sizes the old cache is run at (default --sizes)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--queries", type=int, default=30)
    ap.add_argument("--exact", type=int, default=0, help="exact searches timed (new cache)")
    ap.add_argument("--uniform", action="store_true")
    ap.add_argument("--work", default="/tmp/ict-bench-cache")
    for opt in ("--dir", "--key", "--prompt-key"):
        ap.add_argument(opt)
    ap.add_argument("--n", type=int)
    ap.add_argument("--images", type=int, help="one gallery size (bench_cpu.py's form of --sizes)")
    ap.add_argument("--repeats", type=int, default=2000, help="prompt lookups timed")
    ap.add_argument("--render", help="print the table of a results.json")
    ap.add_argument("--result")
    a = ap.parse_args()
    if a.render:
        print(table(json.loads(Path(a.render).read_text())))
        return 0
    a.sizes = [a.images] if a.images else a.sizes
    if a.child:
        cache = load(a.root)
        out = globals()[f"child_{a.child}"](a, cache)
        with open("/proc/self/status") as f:  # ru_maxrss would carry the driver's peak over exec
            out["peak_rss_bytes"] = next(int(x.split()[1]) * 1024 for x in f if x.startswith("VmHWM"))
        Path(a.result).write_text(json.dumps(out))
        return 0
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    model = tiny_model(work)
    impls = {"new": Path(a.root)} | ({"old": Path(a.old_root)} if a.old_root else {})
    res: dict = {"machine": machine(), "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "runs": {}}
    me = Path(__file__).resolve()

    key_of = {impl: keys(root, model) for impl, root in impls.items()}

    def child(impl, mode, *extra, n, tag=""):
        gal, pkey = key_of[impl]
        folder = work / f"{impl}-{tag or n}{'-uniform' if a.uniform else ''}"
        args = ["--child", mode, "--root", str(impls[impl]), "--dir", str(folder), "--key", gal, "--prompt-key", pkey,
                "--n", str(n), "--repeats", str(a.repeats), *(["--uniform"] if a.uniform else []), *extra]
        res = run_child(me, args, work / "child.json", env={"PYTHONPATH": ""})
        with open(work / "child.json") as f:
            return {**res, "peak_rss_bytes": json.load(f)["peak_rss_bytes"]}

    for n in a.sizes:
        for impl in impls:
            if impl == "old" and n not in (a.old_sizes or a.sizes):
                continue
            folder = work / f"{impl}-{n}{'-uniform' if a.uniform else ''}"
            if not (folder / "built.json").exists():  # a gallery is built once per work folder
                shutil.rmtree(folder, ignore_errors=True)
                (work / "built.json").write_text(json.dumps(child(impl, "build", n=n)))
                shutil.move(work / "built.json", folder / "built.json")
            res["runs"][f"{impl} {n} build"] = json.loads((folder / "built.json").read_text())
        for _round in range(a.rounds):
            for impl in impls:
                if impl == "old" and n not in (a.old_sizes or a.sizes):
                    continue
                extra = ["--queries", str(a.queries)] + (["--exact", str(a.exact)] if impl == "new" else [])
                res["runs"].setdefault(f"{impl} {n} search", []).append(child(impl, "search", *extra, n=n))
                folder = work / f"{impl}-{n}{'-uniform' if a.uniform else ''}"
                cmd = [sys.executable, "-m", "ict_core", "search", PROMPT, "--top-k", "10", "--model", str(model),
                       "--no-hp", "--cache-dir", str(folder)]
                t = time.perf_counter()
                out = subprocess.run(cmd, cwd=impls[impl], capture_output=True, text=True,
                                     env={**os.environ, "PYTHONPATH": str(impls[impl])})
                assert out.returncode == 0 and len(out.stdout.splitlines()) == 11, out.stderr
                res["runs"].setdefault(f"{impl} {n} ict search wall", []).append(time.perf_counter() - t)
    for impl in impls:
        n = a.sizes[0]
        res["runs"][f"{impl} prompt"] = [child(impl, "prompt", n=0, tag=f"prompts{r}") for r in range(a.rounds)]
        res["runs"][f"{impl} {n} index cost"] = child(impl, "index_cost", "--rounds", "20", n=n)
    (work / "results.json").write_text(json.dumps(res, indent=1))
    print(table(res))
    return 0


def table(res: dict) -> str:
    """A markdown table of the medians over rounds, one column per implementation and size."""
    runs, cols = res["runs"], []
    for k in runs:
        impl, n, *_ = k.split(" ")
        if n.isdigit() and (impl, int(n)) not in cols:
            cols.append((impl, int(n)))

    def med(impl, n, what, field, scale=1.0):
        v = runs.get(f"{impl} {n} {what}" if n is not None else f"{impl} {what}")
        v = [x.get(field) if isinstance(x, dict) else x for x in (v if isinstance(v, list) else [v])] if v else []
        v = median(v)
        return "" if v is None else f"{v * scale:.3g}"

    rows = [("store the gallery (s)", "build", "store_s", 1), ("first search: faiss index built (s)", "build",
            "first_search_s", 1), ("disk (GB)", "build", "disk_bytes", 1e-9),
            ("fresh process: open + first top-10 search (ms)", "search", "fresh_first_search_s", 1e3),
            ("top-10 search p50 (ms)", "search", "top10_p50_ms", 1),
            ("top-10 search p50, exact (ms)", "search", "exact_top10_p50_ms", 1),
            ("recall@10 of the default vs exact", "search", "recall_at_10", 1),
            ("peak RSS of the search process (GB)", "search", "peak_rss_bytes", 1e-9),
            ("`ict search` wall, fresh process, cached prompt (s)", "ict search wall", None, 1),
            ("index: cache time per image (ms)", "index cost", "cache_ms_per_image", 1)]
    out = ["| | " + " | ".join(f"{i} {n:,}" for i, n in cols) + " |", "|---|" + "---:|" * len(cols)]
    for label, what, field, scale in rows:
        out.append(f"| {label} | " + " | ".join(med(i, n, what, field, scale) for i, n in cols) + " |")
    for impl in dict.fromkeys(i for i, _ in cols):
        out.append(f"| prompt hit p50, {impl} (ms) | " + med(impl, None, "prompt", "prompt_hit_p50_ms") + " |"
                   + " |" * (len(cols) - 1))
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
