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


# ------------------------------------------------------------------------------- host cast-at-use layers
# A host may supply its own layer classes (`operations`: a namespace with Linear, Conv2d, LayerNorm and
# Embedding, subclasses of torch's, that cast their weights to the input's dtype and device at use, like
# ComfyUI's comfy.ops.manual_cast).  The weights then wait in a storage dtype and on whatever device the
# host's memory manager leaves them (partially loaded on a small GPU), and compute still runs in `dtype`.
_OPS_LAYERS = ("Linear", "Conv2d", "LayerNorm", "Embedding")
# Tensors read outside those layers (class_embedding, logit_scale), or whose dtype sets the dtype of what
# follows (transformers casts the pixels to the patch embedding's dtype; an embedding returns its table's
# dtype): small, kept in the compute dtype.
_COMPUTE_DTYPE_NAMES = ("class_embedding", "patch_embedding.", "position_embedding.", "token_embedding.",
                        "logit_scale")


def host_storage_dtype(name: str, dtype: torch.dtype, preferred: torch.dtype | None) -> torch.dtype | None:
    """The dtype tensor `name` waits in with host layers (None = as stored in the file).

    `dtype` is the compute dtype, `preferred` the host's storage dtype for auxiliary encoders.  Scoring in
    fp32 (the official scores), a weight waits in `preferred` only when that is fp32, else in the file's
    own dtype (bf16/fp16/fp32: exact in fp32, so the scores are the fp32 model's bit for bit); in fp16/bf16
    (the user's choice) it waits in that dtype.  The HP head always stays fp32."""
    if name.startswith("head."):
        return torch.float32
    if any(k in name for k in _COMPUTE_DTYPE_NAMES) or dtype != torch.float32:
        return dtype
    return torch.float32 if preferred == torch.float32 else None


def use_host_layers(model: nn.Module, operations) -> nn.Module:
    """Make torch's Linear/Conv2d/LayerNorm/Embedding layers of `model` the host's cast-at-use classes
    (same parameters, same state dict; only the forward changes)."""
    swap = {getattr(nn, n): getattr(operations, n) for n in _OPS_LAYERS if hasattr(operations, n)}
    for mod in model.modules():
        cls = swap.get(type(mod))
        if cls is not None:
            mod.__class__ = cls
            if not hasattr(mod, "bias"):  # cast-at-use layers treat weight and bias alike (Embedding has none)
                mod.bias = None
    return model


def activation_bytes(modules: RewardModules, dtype: torch.dtype) -> int:
    """Upper estimate of the memory one image needs while it runs through a vision tower (ICT and HP run
    one after the other, so the larger counts): hidden states, attention and MLP of one layer at a time
    (inference keeps no activations across layers), plus the pixels."""
    cfgs = [modules.ict.config.vision_config]
    if modules.hp is not None:
        cfgs.append(modules.hp.vision.config)
    size = torch.empty((), dtype=dtype).element_size()
    per = 0
    for c in cfgs:
        tokens = (c.image_size // c.patch_size) ** 2 + 1
        elements = tokens * (6 * c.hidden_size + 2 * c.intermediate_size) + c.num_attention_heads * tokens * tokens
        per = max(per, elements * size + 3 * c.image_size * c.image_size * 4)
    return int(per * 1.5)


def build_ict(arch: dict[str, Any], state: dict[str, torch.Tensor], device: torch.device,
              dtype: torch.dtype, operations=None) -> nn.Module:
    """ICT CLIPModel from a state dict already on `device`; no random initialisation is ever run.
    With host `operations` the tensors keep the dtypes they were loaded in (host_storage_dtype)."""
    with torch.device("meta"):
        model = _ict_module(arch)
    model = _materialise(model, state, device)
    if operations is not None:
        return use_host_layers(model, operations)
    for name, child in model.named_children():
        if keeps_storage_dtype(name + ".", dtype):
            _cast_at_use(child, dtype)
        else:
            child.to(dtype)
    for p in model.parameters(recurse=False):  # logit_scale
        p.data = p.data.to(dtype)
    return model


def build_hp(arch: dict[str, Any], state: dict[str, torch.Tensor], device: torch.device,
             dtype: torch.dtype, operations=None) -> HPModel:
    """HP model from a file state dict on `device`; the tiny head stays fp32 whatever the tower's dtype."""
    with torch.device("meta"):
        model = HPModel(to_clip_config(arch))
    model = _materialise(model, {_module_key(k): v for k, v in state.items()}, device)
    if operations is not None:
        return use_host_layers(model, operations)
    model.vision.to(dtype)
    model.head.float()
    return model


class RewardModules(nn.Module):
    """Every weight of a scorer in one module, so hosts can move it as a unit (e.g. a ComfyUI ModelPatcher)."""

    def __init__(self, ict: nn.Module, hp: HPModel | None):
        super().__init__()
        self.ict = ict
        self.hp = hp
        self.device = None  # where a host's memory manager runs the model (ComfyUI's ModelPatcher sets it)
