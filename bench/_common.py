"""Shared helpers of the benchmarks: the work folder (random weights in the released layouts, test
images), child-process plumbing, statistics. Nothing here imports from tests/.

The work folder is built once and reused (a manifest records what is in it):

    WORK/config.json            CLIPConfig of the run (ViT-H-14, or a tiny one with --tiny)
    WORK/ICT/pytorch_model.bin  8y/ICT layout: bf16 full CLIPModel state dict + legacy position_ids
    WORK/HP/hp_backbone/...     8y/HP layout: fp32 CLIPModel (+config.json), hp_scorer/mlp_pytorch_model.bin
    WORK/ict.safetensors        the same ICT weights through ict_core.weights.convert
    WORK/hp.safetensors         the same HP weights through ict_core.weights.convert
    WORK/images/*.png|jpg       8 images of 512-1024 px
"""
from __future__ import annotations

import json
import logging
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

log = logging.getLogger("bench")

DEFAULT_WORK = Path(os.environ.get("ICT_BENCH_WORK", "/tmp/ict-bench"))
PROMPT = "a red fox standing in fresh snow at sunrise, photograph"
GFLOPS_PER_IMAGE = 334.6   # ViT-H-14 image tower at 224 px (FACTS.md)

# ViT-H-14 (laion2B) as in FACTS.md: the package's own record; the tiny config is only for smoke tests.
sys.path.insert(0, str(ROOT / "tests"))
from ict_core.config import VIT_H_14 as VIT_H  # noqa: E402
from tiny_config import TINY  # noqa: E402  (the tests' tiny architecture)

HP_WIDTHS = (1024, 128, 64, 16)
N_IMAGES = 8
IMAGE_SPECS = [  # (name, height, width): mixed sizes and aspect ratios, 512-1024 px
    ("0.png", 512, 512), ("1.jpg", 768, 512), ("2.png", 1024, 1024), ("3.jpg", 640, 960),
    ("4.png", 1024, 576), ("5.jpg", 832, 832), ("6.png", 512, 896), ("7.jpg", 1000, 750),
]


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")


# ----------------------------------------------------------------------------------------------- the work folder
def clip_config(cfg: dict):
    from transformers import CLIPConfig

    return CLIPConfig(text_config=dict(cfg["text_config"]), vision_config=dict(cfg["vision_config"]),
                      projection_dim=cfg["projection_dim"])


def _random_clip(cfg: dict, seed: int, gain: float):
    """A transformers CLIPModel with its own random init; matrices scaled by `gain` to spread the scores."""
    import torch
    from transformers import CLIPModel

    torch.manual_seed(seed)
    model = CLIPModel(clip_config(cfg))
    if gain != 1.0:
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.ndim >= 2 and "embedding" not in name:
                    p.mul_(gain)
    return model.eval()


def _mlp_state(dim: int, seed: int) -> dict:
    """The official HP head layout: keys layers.{0,2,4,6,7}.{weight,bias}."""
    import torch

    torch.manual_seed(seed)
    w = (dim, *HP_WIDTHS, 1)
    idx = (0, 2, 4, 6, 7)
    sd = {}
    for i, (a, b) in zip(idx, zip(w[:-1], w[1:])):
        lin = torch.nn.Linear(a, b)
        sd[f"layers.{i}.weight"], sd[f"layers.{i}.bias"] = lin.weight.detach().clone(), lin.bias.detach().clone()
    return sd


def _save_ict_layout(model, folder: Path, cfg: dict) -> None:
    """8y/ICT: one pytorch_model.bin, bf16, full CLIPModel keys plus the legacy int64 position_ids buffers."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    v = cfg["vision_config"]
    for tower, n in (("text_model", cfg["text_config"]["max_position_embeddings"]),
                     ("vision_model", (v["image_size"] // v["patch_size"]) ** 2 + 1)):
        sd[f"{tower}.embeddings.position_ids"] = torch.arange(n, dtype=torch.int64).unsqueeze(0)
    torch.save(sd, folder / "pytorch_model.bin")


def _save_hp_layout(model, mlp_sd: dict, folder: Path) -> None:
    """8y/HP: hp_backbone/ (save_pretrained-style config.json + fp32 pytorch_model.bin),
    hp_scorer/mlp_pytorch_model.bin."""
    import torch

    (folder / "hp_backbone").mkdir(parents=True, exist_ok=True)
    (folder / "hp_scorer").mkdir(parents=True, exist_ok=True)
    sd = dict(model.state_dict())
    sd["text_model.embeddings.position_ids"] = torch.arange(
        model.config.text_config.max_position_embeddings, dtype=torch.int64).unsqueeze(0)
    torch.save(sd, folder / "hp_backbone" / "pytorch_model.bin")
    (folder / "hp_backbone" / "config.json").write_text(json.dumps(model.config.to_dict(), default=str))
    torch.save(mlp_sd, folder / "hp_scorer" / "mlp_pytorch_model.bin")


def _make_images(folder: Path, tiny: bool) -> list[Path]:
    """Smooth coloured patterns plus noise, each image different in hue, frequency and layout."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    out = []
    for k, (name, h, w) in enumerate(IMAGE_SPECS):
        y, x = np.mgrid[0:h, 0:w].astype(np.float32)
        f = 5 + 9 * k
        chans = [np.sin(x / (f + 3 * c) + y / (f * 1.7 + c) + k) * np.cos(y / (f * 0.6 + 2 * c)) for c in range(3)]
        base = np.stack(chans, -1) * 0.35 + 0.5 + 0.25 * np.array(rng.uniform(-1, 1, 3), np.float32)
        if k % 2:
            cy, cx = rng.uniform(0.2, 0.8, 2)
            base[((y / h - cy) ** 2 + (x / w - cx) ** 2) < 0.04] = rng.uniform(0, 1, 3)
        arr = np.clip((base + rng.normal(0, 0.06, base.shape)) * 255, 0, 255).astype(np.uint8)
        path = folder / name
        Image.fromarray(arr, "RGB").save(path, **({"quality": 92} if name.endswith(".jpg") else {}))
        out.append(path)
    return out


def image_paths(work: Path) -> list[Path]:
    return [work / "images" / name for name, _, _ in IMAGE_SPECS]


def ensure_work(work: Path, tiny: bool = False, gain: float = 1.0) -> dict:
    """Build the work folder once; reuse it when its manifest matches."""
    manifest_path = work / "manifest.json"
    cfg = TINY if tiny else VIT_H
    want = {"config": cfg, "gain": gain, "images": IMAGE_SPECS, "version": 1}
    if manifest_path.exists():
        have = json.loads(manifest_path.read_text())
        if {k: have.get(k) for k in want} == json.loads(json.dumps(want)):
            log.info("reusing work folder %s", work)
            return have
        raise SystemExit(f"{work} holds another bench setup; remove it or pass --work ANOTHER_DIR")
    import torch

    from ict_core.weights import convert

    work.mkdir(parents=True, exist_ok=True)
    (work / "config.json").write_text(json.dumps(cfg))
    t = time.perf_counter()
    log.info("building random ICT weights (%s) in the 8y/ICT layout", "tiny" if tiny else "ViT-H-14")
    ict = _random_clip(cfg, 1, gain)
    _save_ict_layout(ict, work / "ICT", cfg)
    del ict
    log.info("building random HP weights in the 8y/HP layout")
    hp = _random_clip(cfg, 2, gain)
    _save_hp_layout(hp, _mlp_state(cfg["projection_dim"], 3), work / "HP")
    del hp
    torch.cuda.empty_cache() if torch.cuda.is_available() else None
    log.info("converting with ict_core.weights.convert")
    convert(work / "ICT", work / "ict.safetensors", work / "config.json")
    convert(work / "HP", work / "hp.safetensors")
    _make_images(work / "images", tiny)
    have = dict(want, built_s=round(time.perf_counter() - t, 1), sizes_bytes={
        p: (work / p).stat().st_size for p in ("ICT/pytorch_model.bin", "HP/hp_backbone/pytorch_model.bin",
                                                "ict.safetensors", "hp.safetensors")})
    manifest_path.write_text(json.dumps(have, indent=1))
    log.info("work folder ready in %.0f s: %s", have["built_s"], work)
    return have


# ------------------------------------------------------------------------------------------------ measurements
def maxrss_bytes(who: int = resource.RUSAGE_SELF) -> int:
    """Peak resident set size of this process. On Linux its own VmHWM: ru_maxrss keeps, across exec, the
    RSS of the parent it was forked from (a driver that has just built ViT-H weights sets a child's "peak"
    to its own 6.7 GB)."""
    if who == resource.RUSAGE_SELF and sys.platform.startswith("linux"):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))
    r = resource.getrusage(who).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024


def run_child(script: Path, args: list[str], out_json: Path, env: dict | None = None,
              timeout: float = 3600) -> dict:
    """Run one measured child in a fresh interpreter; returns its JSON plus wall time and peak RSS."""
    out_json.unlink(missing_ok=True)
    cmd = [sys.executable, str(script), *args, "--result", str(out_json)]
    log.info("child: %s", " ".join(args))
    t = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})})
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    rc = os.waitstatus_to_exitcode(status)
    proc.returncode = rc
    if rc != 0:
        raise RuntimeError(f"child {' '.join(args)} failed with exit status {rc}")
    res = json.loads(out_json.read_text())
    rss = usage.ru_maxrss if sys.platform == "darwin" else usage.ru_maxrss * 1024
    res.update(process_wall_s=wall, peak_rss_bytes=res.get("peak_rss_bytes") or rss)  # the child's own, if told
    del before
    return res


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def pair_ratios(num: list, den: list) -> list:
    return [a / b for a, b in zip(num, den) if a is not None and b]


def machine() -> dict[str, Any]:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    info["cpu"] = line.split(":", 1)[1].strip()
                    break
        with open("/proc/meminfo") as f:
            info["mem_total_gb"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    try:
        import torch
        import transformers
        info.update(torch=torch.__version__, transformers=transformers.__version__,
                    torch_threads=torch.get_num_threads())
    except ImportError:
        pass
    return info
