"""The ICT and HP networks, built on transformers' CLIP classes without random initialisation."""
from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

from .config import to_clip_config

log = logging.getLogger(__name__)

HP_HIDDEN = (1024, 128, 64, 16)  # the official MLP head widths (FACTS.md)


class HPHead(nn.Module):
    """The HP scorer MLP. No activations: in eval mode it is one affine map, kept layer by layer for fidelity."""

    def __init__(self, in_features: int):
        super().__init__()
        w = (in_features, *HP_HIDDEN)
        self.layers = nn.Sequential(
            nn.Linear(w[0], w[1]), nn.Dropout(0.2), nn.Linear(w[1], w[2]), nn.Dropout(0.2),
            nn.Linear(w[2], w[3]), nn.Dropout(0.1), nn.Linear(w[3], w[4]), nn.Linear(w[4], 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class HPModel(nn.Module):
    """HP: CLIP vision tower + visual projection + MLP head on the unnormalised projected features."""

    def __init__(self, clip_config):
        super().__init__()
        from transformers import CLIPVisionModelWithProjection

        vcfg = clip_config.vision_config
        vcfg.projection_dim = clip_config.projection_dim
        self.vision = CLIPVisionModelWithProjection(vcfg)
        self.head = HPHead(clip_config.projection_dim)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        pooled = self.vision.vision_model(pixel_values=pixel_values).pooler_output
        feats = self.vision.visual_projection(pooled)
        head_dtype = self.head.layers[0].weight.dtype
        return self.head(feats.to(head_dtype)).squeeze(-1).float()


def _ict_module(arch: dict[str, Any]) -> nn.Module:
    from transformers import CLIPModel

    return CLIPModel(to_clip_config(arch))


def expected_ict_shapes(arch: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor a full ICT CLIPModel state dict holds, legacy position_ids excluded."""
    with torch.device("meta"):
        model = _ict_module(arch)
    return {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("position_ids")}


def expected_hp_shapes(arch: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor the HP file holds: the vision tower, the visual projection and the head."""
    with torch.device("meta"):
        model = HPModel(to_clip_config(arch))
    return {_hp_file_key(k): tuple(v.shape) for k, v in model.state_dict().items()
            if not k.endswith("position_ids")}


def _hp_file_key(module_key: str) -> str:
    """HPModel keys -> keys in the HP safetensors file (the released backbone's names, head under `head.`)."""
    return module_key[len("vision."):] if module_key.startswith("vision.") else module_key


def _module_key(file_key: str) -> str:
    return file_key if file_key.startswith("head.") else "vision." + file_key


def _restore_position_ids(model: nn.Module, device: torch.device) -> None:
    """position_ids are non-persistent buffers: rebuild them on the device after a meta-device build."""
    for mod in model.modules():
        buf = getattr(mod, "position_ids", None)
        if isinstance(buf, torch.Tensor) and buf.is_meta:
            mod.register_buffer("position_ids", torch.arange(buf.shape[-1], device=device).expand((1, -1)),
                                persistent=False)


def _materialise(model: nn.Module, state: dict[str, torch.Tensor], device: torch.device) -> nn.Module:
    # position_ids are buffers the files never hold (persistent in transformers < 4.31): rebuilt below
    res = model.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in res.missing_keys if not k.endswith("position_ids")]
    if missing or res.unexpected_keys:  # pragma: no cover - open_model_file checked the names already
        raise RuntimeError(f"state dict mismatch: missing {missing[:5]}, unexpected {res.unexpected_keys[:5]}")
    _restore_position_ids(model, device)
    leftovers = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftovers:  # pragma: no cover - would mean a transformers change we do not know about
        raise RuntimeError(f"tensors left uninitialised after load: {leftovers[:5]}")
    return model.eval().requires_grad_(False)


TEXT_PREFIXES = ("text_model.", "text_projection.")


def keeps_storage_dtype(name: str, dtype: torch.dtype) -> bool:
    """Whether ICT tensor `name` stays in the file's dtype in memory, cast to `dtype` only when used.

    The text tower (a third of ICT) runs once per new prompt. Scoring in fp32, its bf16 weights (as
    released) are kept in bf16 and cast layer by layer at use: bf16 -> fp32 is exact, so the scores are
    bit-identical while the resident model is 1.4 GB smaller at ViT-H size. The vision tower, the hot
    path, is materialised in the compute dtype."""
    return dtype == torch.float32 and name.startswith(TEXT_PREFIXES)


class _CastAtUse(nn.Module):
    """A parametrization: the stored tensor is the exact narrow original, the module sees it cast."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.dtype = dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.dtype)


def _cast_at_use(module: nn.Module, dtype: torch.dtype) -> None:
    from torch.nn.utils import parametrize

    for mod in list(module.modules()):
        for pname, p in list(mod.named_parameters(recurse=False)):
            if p.is_floating_point() and p.dtype != dtype:
                parametrize.register_parametrization(mod, pname, _CastAtUse(dtype), unsafe=True)


def build_ict(arch: dict[str, Any], state: dict[str, torch.Tensor], device: torch.device,
              dtype: torch.dtype) -> nn.Module:
    """ICT CLIPModel from a state dict already on `device`; no random initialisation is ever run."""
    with torch.device("meta"):
        model = _ict_module(arch)
    model = _materialise(model, state, device)
    for name, child in model.named_children():
        if keeps_storage_dtype(name + ".", dtype):
            _cast_at_use(child, dtype)
        else:
            child.to(dtype)
    for p in model.parameters(recurse=False):  # logit_scale
        p.data = p.data.to(dtype)
    return model


def build_hp(arch: dict[str, Any], state: dict[str, torch.Tensor], device: torch.device,
             dtype: torch.dtype) -> HPModel:
    """HP model from a file state dict on `device`; the tiny head stays fp32 whatever the tower's dtype."""
    with torch.device("meta"):
        model = HPModel(to_clip_config(arch))
    model = _materialise(model, {_module_key(k): v for k, v in state.items()}, device)
    model.vision.to(dtype)
    model.head.float()
    return model


class RewardModules(nn.Module):
    """Every weight of a scorer in one module, so hosts can move it as a unit (e.g. a ComfyUI ModelPatcher)."""

    def __init__(self, ict: nn.Module, hp: HPModel | None):
        super().__init__()
        self.ict = ict
        self.hp = hp
