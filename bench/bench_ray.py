"""`ict score --ray` against plain `ict score` on this machine: what Ray costs, what it gives.

Why: --ray is for many GPUs and machines; on one machine it adds a Ray start, actor start-up and
object-store copies, and may overlap decoding with scoring. This measures both paths side by side,
each run a fresh `python -m ict_core score` child (model load included, as a user pays it), at two
input sizes, so that the fixed cost (start + load) and the marginal cost per image separate:

    per image = (wall(N) - wall(N0)) / (N - N0)      fixed = wall(N0) - N0 * per image

    python bench/bench_ray.py                      # tiny CLIP (ICT+HP) and ViT-H-14 (ICT), ~40 min
    python bench/bench_ray.py --shapes tiny        # ~15 min

Modes: plain, ray with 1 actor, ray with 2 actors, run in turn (plain, ray1, ray2, plain, ...) so a
shared machine's drift hits all alike. Every ray run also checks its Parquet against the plain
run's JSON (max |difference| of ict/hp/score). Results: bench/out/ray-SHAPES.json and a markdown table.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import PROMPT, ROOT, ensure_work, image_paths, machine, median, setup_logging  # noqa: E402

MODES = ("plain", "ray1", "ray2")


def image_folder(work: Path, n: int) -> Path:
    """n images: the work folder's 8 (512-1024 px) repeated under new names (each one decoded and scored)."""
    folder = work / f"images-{n}"
    if not folder.exists() or len(list(folder.iterdir())) != n:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        src = image_paths(work)
        for i in range(n):
            s = src[i % len(src)]
            shutil.copy(s, folder / f"{i:05d}{s.suffix}")
    return folder


def run_once(mode: str, folder: Path, work: Path, hp: bool, batch: int, tmp: Path) -> dict:
    cmd = [sys.executable, "-m", "ict_core", "score", str(folder), "--prompt", PROMPT, "--device", "cpu",
           "--model", str(work / "ict.safetensors"), "--config", str(work / "config.json"), "--no-cache", "-q"]
    cmd += ["--hp-model", str(work / "hp.safetensors")] if hp else ["--no-hp"]
    out = tmp / f"out-{mode}-{time.monotonic_ns()}"
    if mode == "plain":
        cmd += ["--json"]
    else:
        cmd += ["--ray", "--out", str(out), "--actors", mode[-1], "--batch-size", str(batch)]
    t = time.perf_counter()
    p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if p.returncode:
        raise SystemExit(f"{mode} failed ({p.returncode}): {p.stderr[-2000:]}")
    res = {"mode": mode, "n": len(list(folder.iterdir())), "wall_s": wall}
    if mode == "plain":
        res["scores"] = {r["image"]: r for r in json.loads(p.stdout)["results"]}
    else:
        import pyarrow.parquet as pq

        res["scores"] = {r["path"]: r for r in pq.read_table(out).to_pylist()}
        shutil.rmtree(out)
    return res


def max_diff(a: dict, b: dict) -> float:
    d = 0.0
    for path, r in a.items():
        s = b[str(Path(path).resolve())] if str(Path(path).resolve()) in b else b[path]
        for k in ("ict", "hp", "score"):
            if r.get(k) is not None:
                d = max(d, abs(r[k] - s[k]))
    return d


def measure(shape: str, work: Path, n: int, n0: int, rounds: int, batch: int, hp: bool) -> dict:
    folders = {k: image_folder(work, k) for k in (n0, n)}
    runs = []
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp:
        for r in range(rounds):
            for size in (n0, n):
                plain = None
                for mode in MODES:
                    res = run_once(mode, folders[size], work, hp, batch, Path(tmp))
                    if mode == "plain":
                        plain = res["scores"]
                    else:
                        res["max_abs_diff_vs_plain"] = max_diff(plain, res["scores"])
                    del res["scores"]
                    res["round"] = r
                    print(f"{shape} round {r} n={size} {mode}: {res['wall_s']:.1f} s"
                          + (f", max |diff| {res['max_abs_diff_vs_plain']:.2e}" if mode != "plain" else ""),
                          flush=True)
                    runs.append(res)
    return {"shape": shape, "n": n, "n0": n0, "rounds": rounds, "batch": batch, "hp": hp, "runs": runs,
            "summary": summarise(runs, n0, n)}


def summarise(runs: list[dict], n0: int, n: int) -> dict:
    """Per mode, from the median walls at N0 and N over the rounds (robust to one slow run on a shared
    machine): marginal cost per image, fixed cost, and the median within-round wall ratio to plain."""
    summary = {}
    for mode in MODES:
        w0 = median([x["wall_s"] for x in runs if x["mode"] == mode and x["n"] == n0])
        w1 = median([x["wall_s"] for x in runs if x["mode"] == mode and x["n"] == n])
        per_image = (w1 - w0) / (n - n0)
        ratios = [x["wall_s"] / p["wall_s"] for x in runs for p in runs if x["mode"] == mode and
                  p["mode"] == "plain" and x["n"] == p["n"] == n and x["round"] == p["round"]]
        summary[mode] = {"per_image_s": per_image, "images_per_s": 1 / per_image if per_image > 0 else None,
                         "fixed_s": w0 - n0 * per_image, "wall_n_s": w1, "wall_ratio_vs_plain": median(ratios),
                         "rounds": len(ratios),
                         "max_abs_diff_vs_plain": max((x.get("max_abs_diff_vs_plain", 0) for x in runs
                                                       if x["mode"] == mode), default=0)}
    return summary


def merge(files: list[str]) -> list[dict]:
    """The runs of several result files, per shape, summarised together (rounds renumbered)."""
    merged: dict[str, dict] = {}
    for f in files:
        for res in json.loads(Path(f).read_text())["results"]:
            m = merged.setdefault(res["shape"], dict(res, runs=[], rounds=0))
            m["runs"] += [dict(x, round=x["round"] + m["rounds"]) for x in res["runs"]]
            m["rounds"] += res["rounds"]
    for m in merged.values():
        m["summary"] = summarise(m["runs"], m["n0"], m["n"])
    return list(merged.values())


def crop_cost(work: Path, rounds: int = 3) -> dict:
    """The CPU stage alone, in this process (one thread, as in a Ray task): read + sha256 + decode +
    crop per image of the work folder's 8 (512-1024 px), and the bytes it ships per image."""
    import numpy as np

    from ict_core.scale.stages import prepare

    paths = [str(p) for p in image_paths(work)]
    batch = {"index": np.arange(len(paths)), "path": np.array(paths, dtype=object)}
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        out = list(prepare(batch))
        times.append((time.perf_counter() - t) / len(paths))
    return {"per_image_ms": median(times) * 1e3, "shipped_bytes_per_image": out[0]["pixels"][0].nbytes,
            "image_sizes": "512-1024 px PNG/JPEG"}


def table(results: list[dict]) -> str:
    lines = ["| shape | mode | images/s (marginal) | s per image | fixed s (start + load) | wall for N | "
             "wall / plain's (median of rounds) | max \\|diff\\| vs plain |", "|---|---|---|---|---|---|---|---|"]
    names = {"plain": "plain `ict score`", "ray1": "`--ray`, 1 actor", "ray2": "`--ray`, 2 actors"}
    for res in results:
        base = res["summary"]["plain"]["per_image_s"]
        for mode in MODES:
            s = res["summary"][mode]
            rel = "" if mode == "plain" or s["per_image_s"] <= 0 else f" ({base / s['per_image_s']:.2f}x plain)"
            lines.append(f"| {res['shape']} ({'ICT+HP' if res['hp'] else 'ICT'}), N={res['n']} | {names[mode]} | "
                         f"{s['images_per_s'] or float('nan'):.2f}{rel} | {s['per_image_s']:.3f} | "
                         f"{s['fixed_s']:.1f} | "
                         f"{s['wall_n_s']:.1f} s | {s['wall_ratio_vs_plain']:.2f} ({s['rounds']} rounds) | "
                         f"{s['max_abs_diff_vs_plain']:.1e} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="tiny,vith", help="tiny and/or vith (comma-separated)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--work", default="/tmp/ict-bench-ray", help="work folders go in WORK-tiny, WORK-vith")
    ap.add_argument("--tiny-n", default="16,64", help="N0,N images for the tiny shape")
    ap.add_argument("--vith-n", default="4,12", help="N0,N images for ViT-H (about 5 s each on 2 cores)")
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="only print the table of earlier result files, "
                                                               "their rounds pooled per shape")
    ap.add_argument("--result", help="JSON file for the raw runs (default bench/out/ray-SHAPES.json)")
    args = ap.parse_args(argv)
    if args.merge:
        print(table(merge(args.merge)))
        return 0
    setup_logging()
    results = []
    for shape in args.shapes.split(","):
        n0, n = map(int, getattr(args, f"{shape}_n").split(","))
        work = Path(f"{args.work}-{shape}")
        ensure_work(work, tiny=shape == "tiny")
        # ViT-H: ICT alone, so that two actors (two model copies, ~4 GB each) fit a shared 24 GB machine
        # batches of 8 (tiny) and 4 (ViT-H): N gives 2 actors several batches to share
        results.append(measure(shape, work, n, n0, args.rounds, batch=8 if shape == "tiny" else 4,
                               hp=shape == "tiny"))
    crop = crop_cost(Path(f"{args.work}-{args.shapes.split(',')[0]}"))
    out = Path(args.result) if args.result else ROOT / "bench" / "out" / f"ray-{args.shapes.replace(',', '-')}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"machine": machine(), "crop_stage": crop, "results": results}, indent=1))
    print(table(results))
    print(f"crop stage (read, sha256, decode, crop; one thread): {crop['per_image_ms']:.1f} ms per image, "
          f"{crop['shipped_bytes_per_image']} bytes shipped per image")
    print(f"raw runs: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
