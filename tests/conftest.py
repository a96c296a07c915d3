"""Tiny random CLIP models saved in the exact released layouts (8y/ICT, 8y/HP), converted once per session."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import v3_standin  # noqa: E402
from hosts import COMFYUI, REQUIRE_ENV, hosts_required, is_real_host_test  # noqa: E402

# Small but complete: the real vocabulary (open_clip ids reach 49407), 77 positions, 224 px input.
from tiny_config import TINY  # noqa: E402, F401  (re-exported to the tests)

v3_standin.install()  # any test module may import nodes/ (the real comfy_api where ComfyUI is importable)


def pytest_report_header(config):
    """Which real hosts this session runs against (or why the real-host tests skip)."""
    return COMFYUI.describe()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """With ICT_REQUIRE_HOSTS=1 (CI after laying the hosts out) a skipped real-host test is a failure."""
    outcome = yield
    rep = outcome.get_result()
    if rep.skipped and not hasattr(rep, "wasxfail") and hosts_required() and is_real_host_test(item.path):
        reason = rep.longrepr[2] if isinstance(rep.longrepr, tuple) else str(rep.longrepr)
        reason = reason.removeprefix("Skipped: ")
        rep.outcome = "failed"
        rep.longrepr = f"{REQUIRE_ENV}=1 but this real-host test skipped: {reason}"


def pytest_terminal_summary(terminalreporter):
    """One line: how the real-host tests of this session went, and against which ComfyUI."""
    counts: dict[str, int] = {}
    for outcome in ("passed", "failed", "error", "skipped"):
        ids = {rep.nodeid for rep in terminalreporter.stats.get(outcome, [])
               if hasattr(rep, "nodeid") and is_real_host_test(rep.nodeid.split("::")[0])}
        if ids:
            counts[outcome] = len(ids)
    if not counts:
        return
    where = (f"ComfyUI {COMFYUI.version or '?'} (frontend {COMFYUI.frontend_version or '?'}) at {COMFYUI.dir}"
             if not COMFYUI.missing() else "no ComfyUI")
    line = ", ".join(f"{n} {'errors' if k == 'error' else k}" for k, n in counts.items())
    terminalreporter.write_line(f"real-host tests against {where}: {line}")


def tiny_clip(seed: int):
    """A random transformers CLIPModel at the tiny size, with weights large enough to give spread scores."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=TINY["text_config"], vision_config=TINY["vision_config"],
                                 projection_dim=TINY["projection_dim"]))
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0, 0.1)
    return model.eval()


def tiny_mlp(seed: int, dim: int = TINY["projection_dim"]):
    """The official HP head layout: keys layers.{0,2,4,6,7}."""
    torch.manual_seed(seed)
    mlp = torch.nn.Module()
    mlp.layers = torch.nn.Sequential(torch.nn.Linear(dim, 1024), torch.nn.Dropout(0.2), torch.nn.Linear(1024, 128),
                                     torch.nn.Dropout(0.2), torch.nn.Linear(128, 64), torch.nn.Dropout(0.1),
                                     torch.nn.Linear(64, 16), torch.nn.Linear(16, 1))
    mlp.forward = lambda x: mlp.layers(x)
    return mlp.eval()


def save_ict_layout(model, folder: Path) -> Path:
    """8y/ICT: one pytorch_model.bin, bf16, full CLIPModel keys plus the legacy int64 position_ids buffers."""
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    for tower, n in (("text_model", TINY["text_config"]["max_position_embeddings"]),
                     ("vision_model", (224 // TINY["vision_config"]["patch_size"]) ** 2 + 1)):
        sd[f"{tower}.embeddings.position_ids"] = torch.arange(n, dtype=torch.int64).unsqueeze(0)
    torch.save(sd, folder / "pytorch_model.bin")
    return folder


def save_wide_ict_layout(folder: Path) -> Path:
    """An 8y/ICT layout whose pickle (12.6 MB of bf16) outlasts huggingface_hub's 10 MiB download chunk, so that a
    transfer can be caught half done: the tiny architecture with a wider text tower, in the config.json beside it."""
    from transformers import CLIPConfig, CLIPModel

    wide = dict(TINY, text_config=dict(TINY["text_config"], hidden_size=128))
    torch.manual_seed(5)
    model = CLIPModel(CLIPConfig(text_config=wide["text_config"], vision_config=wide["vision_config"],
                                 projection_dim=wide["projection_dim"])).eval()
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: (v.to(torch.bfloat16) if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    torch.save(sd, folder / "pytorch_model.bin")
    (folder / "config.json").write_text(json.dumps(wide))
    return folder


def save_hp_layout(model, mlp, folder: Path) -> Path:
    """8y/HP: hp_backbone/ (save_pretrained-style config.json + pytorch_model.bin), hp_scorer/mlp_pytorch_model.bin."""
    (folder / "hp_backbone").mkdir(parents=True, exist_ok=True)
    (folder / "hp_scorer").mkdir(parents=True, exist_ok=True)
    sd = dict(model.state_dict())
    sd["text_model.embeddings.position_ids"] = torch.arange(77, dtype=torch.int64).unsqueeze(0)
    torch.save(sd, folder / "hp_backbone" / "pytorch_model.bin")
    (folder / "hp_backbone" / "config.json").write_text(json.dumps(model.config.to_dict(), default=str))
    torch.save(mlp.state_dict(), folder / "hp_scorer" / "mlp_pytorch_model.bin")
    return folder


class TinyModels:
    def __init__(self, root: Path):
        from ict_core.weights import convert

        self.root = root
        self.config = root / "tiny_config.json"
        self.config.write_text(json.dumps(TINY))
        self.ict_clip = tiny_clip(1)
        self.hp_clip = tiny_clip(2)
        self.hp_mlp = tiny_mlp(3)
        self.ict_src = save_ict_layout(self.ict_clip, root / "ICT")
        self.hp_src = save_hp_layout(self.hp_clip, self.hp_mlp, root / "HP")
        self.ict = convert(self.ict_src, root / "ict.safetensors", self.config).path
        self.hp = convert(self.hp_src, root / "hp.safetensors").path


@pytest.fixture(scope="session", autouse=True)
def _private_cache_dir(tmp_path_factory):
    """Hosts open the embedding cache at its default place; in tests that is a temporary folder."""
    import os

    old = os.environ.get("ICT_CACHE_DIR")
    os.environ["ICT_CACHE_DIR"] = str(tmp_path_factory.mktemp("ict-cache"))
    yield
    if old is None:
        os.environ.pop("ICT_CACHE_DIR", None)
    else:
        os.environ["ICT_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> TinyModels:
    """Converted tiny ICT/HP files: .ict, .hp (safetensors paths), .ict_src/.hp_src (released layouts), .config."""
    return TinyModels(tmp_path_factory.mktemp("tiny_models"))


def make_images(folder: Path) -> list[Path]:
    """Images of several sizes and modes: RGB JPEG/PNG/WebP, RGBA, grayscale, 16-bit, 1x1, panoramas."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)

    def smooth(h, w, c=3):
        y, x = np.mgrid[0:h, 0:w]
        base = np.stack([np.sin(x / (7 + k * 3) + y / (11 + k)) for k in range(c)], -1)
        noise = rng.normal(0, 0.15, (h, w, c))
        return np.clip((base * 0.4 + 0.5 + noise) * 255, 0, 255).astype(np.uint8)

    out = []
    specs = [("a.png", (512, 512), "RGB"), ("b.jpg", (768, 512), "RGB"), ("c.webp", (300, 640), "RGB"),
             ("d.png", (400, 333), "RGBA"), ("e.png", (256, 384), "L"), ("f.png", (1, 1), "RGB"),
             ("g.png", (230, 1000), "RGB")]
    for name, (h, w), mode in specs:
        c = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
        arr = smooth(h, w, c)
        img = Image.fromarray(arr[..., 0] if c == 1 else arr, mode)
        path = folder / name
        img.save(path, quality=95) if name.endswith(".jpg") else img.save(path)
        out.append(path)
    arr16 = (smooth(200, 300, 1)[..., 0].astype(np.uint16) * 257)
    Image.fromarray(arr16).save(folder / "h16.png")
    out.append(folder / "h16.png")
    return out


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> list[Path]:
    return make_images(tmp_path_factory.mktemp("images"))
