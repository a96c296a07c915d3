"""GPU throughput: ict_core (ICT alone, ICT+HP) at bf16 / fp16 for batch 1, 8, 32, 64 against the model
card's per-image fp32 loop. Run it through bench/gpu.sh on a device machine; see bench/README.md.

    python bench/gpu_bench.py --out "$OUT"            # ViT-H-14 shapes, random weights, about 4-6 minutes
    python bench/gpu_bench.py --tiny --out /tmp/g     # smoke test (tiny CLIP; runs on CPU when no GPU)

What is timed (steady state, after warm-up, torch.cuda.synchronize around the timer):
- ict_core, "tensor" input: Scorer.score(IMAGE, prompt) on a ComfyUI-style IMAGE batch [B,1024,1024,3] float
  already on the GPU (the node pack's path): 8-bit rounding, bicubic resize, crop, normalise, vision
  tower(s), the cosine; chunk_size = B so that the batch is one forward; no EmbeddingCache, as the nodes
  load it, so every call also runs the text tower once for its prompt.
- ict_core, "pil" input (batch 32 only): the same from already-decoded PIL images, the reference's input.
- ict_core, "tensor+cache" (batch 32 only): with an in-memory EmbeddingCache attached, as the CLI does
  (prompt hits, but every image is hashed for the gallery lookup).
- reference: the card's loop, fp32, per image and per prompt, on already-decoded PIL images.
img/s, and the fraction of the FLOP limit: img/s x 334.6 GFLOP (x2 with HP) / the chip's dense bf16/fp16 peak
(and / a measured bf16 GEMM rate). Writes $OUT/gpu.json and $OUT/gpu_throughput.png (if matplotlib exists).
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import sys
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

log = logging.getLogger("bench.gpu")
PEAK_TFLOPS = {"H100 80GB HBM3": 989.4, "H100 SXM": 989.4, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H200": 989.4,
               "A100": 312.0, "L40S": 362.0, "RTX 4090": 165.2}  # dense bf16/fp16 tensor-core peak


def _install_tokenizer_fallback() -> str:
    """open_clip needs torchvision; when it cannot be imported, synthetic token ids keep the timing alive."""
    try:
        from open_clip import get_tokenizer  # noqa: F401
        return "open_clip"
    except Exception as e:  # ImportError, or a torchvision mismatch
        import torch

        from ict_core import text

        log.warning("open_clip unavailable (%s: %s): using synthetic token ids (same shape, [bos ... eos 0...])",
                    type(e).__name__, str(e)[:120])

        def tok(prompts, context_length=77):
            prompts = [prompts] if isinstance(prompts, str) else prompts
            out = torch.zeros(len(prompts), context_length, dtype=torch.long)
            for i, p in enumerate(prompts):
                ids = [49406] + [256 + (ord(c) % 40000) for c in p][:context_length - 2] + [49407]
                out[i, :len(ids)] = torch.tensor(ids)
            return out

        tok.encode = lambda p: list(p)
        text._tokenizer.cache_clear()
        text._tokenizer = lambda: (SimpleNamespace(tokenize=tok, _tokenizer=tok), tok.encode, tok)
        stub = type(sys)("open_clip")
        stub.get_tokenizer = lambda name: tok
        sys.modules["open_clip"] = stub  # for the reference loop's `from open_clip import get_tokenizer`
        return "synthetic (open_clip not importable)"


def _peak(name: str) -> float | None:
    for k, v in PEAK_TFLOPS.items():
        if k in name:
            return v
    return None


def _sync(dev):
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize()


def _timed(fn, dev, warmup: int, min_s: float, max_iters: int) -> tuple[float, int]:
    for _ in range(warmup):
        fn()
    _sync(dev)
    n, t = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        _sync(dev)
        el = time.perf_counter() - t
        if el >= min_s or n >= max_iters:
            return el, n


def gemm_tflops(dev) -> float | None:
    import torch

    if dev.type != "cuda":
        return None
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    el, n = _timed(lambda: a @ b, dev, 3, 1.0, 200)
    return 2 * 8192 ** 3 * n / el / 1e12


def comfy_batch(b: int, size: int, dev):
    import torch

    g = torch.Generator(device="cpu").manual_seed(b)
    y = torch.linspace(0, 1, size).view(size, 1, 1)
    x = torch.linspace(0, 1, size).view(1, size, 1)
    base = torch.sin(x * 20 + y * 7 + torch.arange(3).view(1, 1, 3))
    imgs = (0.5 + 0.3 * base).unsqueeze(0) + 0.1 * torch.rand(b, 1, 1, 3, generator=g)
    return imgs.clamp(0, 1).to(dev)


def pil_images(work: Path, n: int):
    from PIL import Image

    out = []
    paths = C.image_paths(work)
    for i in range(n):
        with Image.open(paths[i % len(paths)]) as im:
            im.load()
            out.append(im.copy())
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=None, help="weights/images folder (built once)")
    ap.add_argument("--tiny", action="store_true", help="tiny CLIP: a smoke test of the script, not a benchmark")
    ap.add_argument("--batches", default="1,8,32,64")
    ap.add_argument("--precisions", default="bf16,fp16")
    ap.add_argument("--image-size", type=int, default=1024)
    ap.add_argument("--min-seconds", type=float, default=1.5, help="timed seconds per configuration")
    ap.add_argument("--ref-images", type=int, default=48)
    ap.add_argument("--budget", type=float, default=400, help="skip what is left after this many seconds")
    args = ap.parse_args(argv)
    C.setup_logging()
    t_start = time.perf_counter()
    args.work = args.work or Path("/tmp/ict-gpu-bench" + ("-tiny" if args.tiny else ""))
    args.out.mkdir(parents=True, exist_ok=True)

    import torch

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tokenizer = _install_tokenizer_fallback()
    C.ensure_work(args.work, tiny=args.tiny)
    from reference_loop import ReferenceLoop

    from ict_core.cache import EmbeddingCache
    from ict_core.scorer import Scorer

    name = torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu"
    peak = _peak(name)
    gemm = gemm_tflops(dev)
    cfg_path = args.work / "config.json" if args.tiny else None
    gflops = C.GFLOPS_PER_IMAGE
    res: dict = {"bench": "gpu", "tiny": args.tiny, "device": name, "torch": torch.__version__,
                 "cuda": torch.version.cuda, "tokenizer": tokenizer, "peak_tflops_dense_bf16": peak,
                 "measured_bf16_gemm_tflops": gemm, "gflops_per_image": gflops, "image_size": args.image_size,
                 "started": dt.datetime.now().astimezone().isoformat(timespec="seconds"), "rows": [],
                 "command": "python bench/gpu_bench.py " + " ".join(sys.argv[1:] if argv is None else argv)}
    log.info("device %s, peak %s TFLOP/s, measured bf16 GEMM %s TFLOP/s", name, peak,
             f"{gemm:.0f}" if gemm else None)

    def frac(img_s, towers):
        if img_s is None:
            return None, None
        flops = img_s * gflops * towers / 1e3  # TFLOP/s
        return (flops / peak if peak else None), (flops / gemm if gemm else None)

    def save():
        res["finished"] = dt.datetime.now().astimezone().isoformat(timespec="seconds")
        res["wall_s"] = time.perf_counter() - t_start
        (args.out / "gpu.json").write_text(json.dumps(res, indent=1))

    batches = [int(b) for b in args.batches.split(",")]
    prompt = C.PROMPT
    ref_pil = pil_images(args.work, max(batches))
    def over_budget(what: str) -> bool:
        if time.perf_counter() - t_start > args.budget:
            log.warning("time budget spent: skipping %s", what)
            res["rows"].append({"skipped": what})
            return True
        return False

    def run_proj(hp: bool, prec: str) -> None:
        model = "ICT+HP" if hp else "ICT"
        if over_budget(f"ict_core {model} {prec}"):
            return
        t = time.perf_counter()
        scorer = Scorer.load(args.work / "ict.safetensors", args.work / "hp.safetensors" if hp else None,
                             device=dev, precision=prec, config=cfg_path)
        _sync(dev)
        load_s = time.perf_counter() - t
        mem = None
        for b in batches:
            scorer.chunk_size = b
            imgs = comfy_batch(b, args.image_size, dev)
            if dev.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            el, n = _timed(lambda s=scorer, x=imgs: s.score(x, prompt), dev, 2, args.min_seconds, 1000)
            if dev.type == "cuda":
                mem = torch.cuda.max_memory_allocated() / 2**30
            img_s = b * n / el
            f_peak, f_gemm = frac(img_s, 2 if hp else 1)
            row = {"side": "ict_core", "input": "tensor", "model": model, "precision": prec,
                   "dtype": str(scorer.dtype), "batch": b, "img_s": img_s, "iters": n, "seconds": el,
                   "frac_peak": f_peak, "frac_gemm": f_gemm, "load_s": load_s, "max_mem_gib": mem}
            res["rows"].append(row)
            log.info("%s %s batch %d: %.1f img/s (%.1f%% of peak)", model, prec, b, img_s,
                     100 * f_peak if f_peak else float("nan"))
            del imgs
        b = 32 if 32 in batches else batches[-1]
        scorer.chunk_size = b
        el, n = _timed(lambda s=scorer, x=ref_pil[:b]: s.score(x, prompt), dev, 1, args.min_seconds, 1000)
        res["rows"].append({"side": "ict_core", "input": "pil", "model": model, "precision": prec, "batch": b,
                            "img_s": b * n / el, "iters": n, "seconds": el})
        # the CLI's path: an EmbeddingCache attached (prompt hits; every image is hashed for the gallery)
        scorer.cache = EmbeddingCache(memory_only=True)
        imgs = comfy_batch(b, args.image_size, dev)
        el, n = _timed(lambda s=scorer, x=imgs: s.score(x, prompt), dev, 1, args.min_seconds, 1000)
        res["rows"].append({"side": "ict_core", "input": "tensor+cache", "model": model, "precision": prec,
                            "batch": b, "img_s": b * n / el, "iters": n, "seconds": el})
        scorer.cache = None
        del imgs
        # bf16/fp16 against the fp32 reference, on the same 8 images (see _summarise)
        res.setdefault("scores", {})[f"{model} {prec}"] = [r.score for r in scorer.score(ref_pil[:8], prompt)]
        del scorer
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        save()

    def run_ref(hp: bool) -> None:
        model = "ICT+HP" if hp else "ICT"
        if over_budget(f"reference {model}"):
            return
        cfg = json.loads((args.work / "config.json").read_text())
        ref = ReferenceLoop(cfg, device=str(dev))
        t = time.perf_counter()
        ref.load_ict(args.work / "ICT")
        if hp:
            ref.load_hp(args.work / "HP")
        _sync(dev)
        load_s = time.perf_counter() - t
        n_img = min(args.ref_images, len(ref_pil))
        ref(ref_pil[:2], [prompt] * 2, use_hp=hp)  # warm-up
        _sync(dev)
        t = time.perf_counter()
        scores = ref(ref_pil[:n_img], [prompt] * n_img, use_hp=hp)
        _sync(dev)
        el = time.perf_counter() - t
        img_s = n_img / el
        f_peak, f_gemm = frac(img_s, 2 if hp else 1)
        res["rows"].append({"side": "reference", "input": "pil", "model": model, "precision": "fp32", "batch": 1,
                            "img_s": img_s, "iters": n_img, "seconds": el, "frac_peak": f_peak,
                            "frac_gemm": f_gemm, "load_s": load_s})
        res.setdefault("scores", {})[f"{model} reference fp32"] = [s[0] * s[1] if hp else s[0] for s in scores[:8]]
        log.info("reference %s: %.1f img/s", model, img_s)
        del ref
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        save()

    precs = args.precisions.split(",")
    # most important first, so that a time-out loses the least: the ICT bf16 headline and its reference
    run_proj(False, precs[0])
    run_ref(False)
    for p in precs[1:]:
        run_proj(False, p)
    for p in precs:
        run_proj(True, p)
    run_ref(True)
    _summarise(res)
    save()
    _plot(res, args.out)
    print(json.dumps(res["summary"], indent=1))
    return 0


def _summarise(res: dict) -> None:
    rows = [r for r in res["rows"] if "img_s" in r]
    ref = {r["model"]: r["img_s"] for r in rows if r["side"] == "reference"}
    summary = {}
    for r in rows:
        if r["side"] == "ict_core" and r["input"] == "tensor":
            base = ref.get(r["model"])
            r["x_reference"] = r["img_s"] / base if base else None
            summary[f"{r['model']} {r['precision']} b{r['batch']}"] = {
                "img_s": round(r["img_s"], 1), "x_reference": round(r["x_reference"], 1) if base else None,
                "frac_peak": round(r["frac_peak"], 3) if r.get("frac_peak") else None}
    for m, v in ref.items():
        summary[f"{m} reference fp32 b1"] = {"img_s": round(v, 2)}
    ict64 = [r for r in rows if r["side"] == "ict_core" and r.get("input") == "tensor" and r["model"] == "ICT"
             and r["precision"] == "bf16" and r["batch"] == 64]
    if ict64:
        summary["target ICT bf16 b64 >= 1500 img/s"] = ict64[0]["img_s"] >= 1500
        summary["target ICT bf16 b64 >= 30x reference"] = (ict64[0].get("x_reference") or 0) >= 30
    sc = res.get("scores", {})
    for key in list(sc):
        if "reference" in key:
            continue
        refk = ("ICT+HP" if key.startswith("ICT+HP") else "ICT") + " reference fp32"
        if refk in sc:
            a, b = sc[key], sc[refk]
            summary[f"max |diff| vs fp32 reference, {key}"] = max(abs(x - y) for x, y in zip(a, b))
    res["summary"] = summary


def _plot(res: dict, out: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib not installed: no plot (gpu.json has every figure)")
        return
    rows = [r for r in res["rows"] if r.get("side") == "ict_core" and r.get("input") == "tensor" and "img_s" in r]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key in sorted({(r["model"], r["precision"]) for r in rows}):
        pts = sorted((r["batch"], r["img_s"]) for r in rows if (r["model"], r["precision"]) == key)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"ict_core {key[0]} {key[1]}")
    for r in res["rows"]:
        if r.get("side") == "reference" and "img_s" in r:
            ax.axhline(r["img_s"], linestyle="--", color="grey" if r["model"] == "ICT" else "black",
                       label=f"model card loop {r['model']} fp32")
    if res.get("peak_tflops_dense_bf16"):
        ax.axhline(res["peak_tflops_dense_bf16"] * 1e3 / res["gflops_per_image"], color="red", linestyle=":",
                   label="ICT FLOP limit (dense peak)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch")
    ax.set_ylabel("images / s")
    ax.set_title(f"{res['device']}{' (TINY smoke test)' if res['tiny'] else ''}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "gpu_throughput.png", dpi=120)
    log.info("wrote %s", out / "gpu_throughput.png")


if __name__ == "__main__":
    sys.exit(main())
