"""The CLIP architecture the ICT and HP weights were trained with, shipped in code so no hub access is needed."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import InputError

# laion/CLIP-ViT-H-14-laion2B-s32B-b79K (FACTS.md, "Architecture"). Only the fields that shape the weights
# or the computation are listed; everything else takes transformers' defaults.
_TEXT_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "vocab_size",
              "max_position_embeddings", "hidden_act", "layer_norm_eps", "bos_token_id", "eos_token_id",
              "pad_token_id")
_VISION_KEYS = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "patch_size",
                "image_size", "num_channels", "hidden_act", "layer_norm_eps")

VIT_H_14: dict[str, Any] = {
    "projection_dim": 1024,
    "text_config": {
        "hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16, "num_hidden_layers": 24,
        "vocab_size": 49408, "max_position_embeddings": 77, "hidden_act": "gelu", "layer_norm_eps": 1e-5,
        "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1,
    },
    "vision_config": {
        "hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 16, "num_hidden_layers": 32,
        "patch_size": 14, "image_size": 224, "num_channels": 3, "hidden_act": "gelu", "layer_norm_eps": 1e-5,
    },
}

# Activations transformers' CLIP accepts under these names in every supported version.
ACTIVATIONS = ("gelu", "quick_gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "relu", "silu", "swish")
_POSITIVE = ("hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers", "vocab_size",
             "max_position_embeddings", "patch_size", "image_size", "num_channels")


def architecture(cfg: dict[str, Any]) -> dict[str, Any]:
    """Reduce a CLIPConfig dict (possibly a full config.json) to the canonical fields that define the weights,
    checked: a record that could not build the model the engine runs is refused here, in one line."""
    if not isinstance(cfg, dict):
        raise InputError(f"not a CLIPConfig (a JSON {type(cfg).__name__}); give a transformers CLIPConfig JSON")
    text, vision = cfg.get("text_config") or {}, cfg.get("vision_config") or {}
    if not isinstance(text, dict) or not isinstance(vision, dict):
        raise InputError("not a CLIPConfig: text_config and vision_config must be objects")
    base_t, base_v = VIT_H_14["text_config"], VIT_H_14["vision_config"]
    arch = {
        "projection_dim": cfg.get("projection_dim", VIT_H_14["projection_dim"]),
        "text_config": {k: text.get(k, base_t[k]) for k in _TEXT_KEYS},
        "vision_config": {k: vision.get(k, base_v[k]) for k in _VISION_KEYS},
    }
    _check(arch)
    return arch


def _check(arch: dict[str, Any]) -> None:
    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    problems = [] if is_int(arch["projection_dim"]) and arch["projection_dim"] > 0 else ["projection_dim"]
    for tower in ("text_config", "vision_config"):
        c = arch[tower]
        bad = [k for k in _POSITIVE if k in c and not (is_int(c[k]) and c[k] > 0)]
        if c["hidden_act"] not in ACTIVATIONS:
            bad.append(f"hidden_act {c['hidden_act']!r}")
        eps = c["layer_norm_eps"]
        if not (isinstance(eps, (int, float)) and not isinstance(eps, bool) and 0 < eps < 1):
            bad.append("layer_norm_eps")
        if not bad and c["hidden_size"] % c["num_attention_heads"]:
            bad.append(f"num_attention_heads {c['num_attention_heads']} (does not divide hidden_size "
                       f"{c['hidden_size']})")
        problems += [f"{tower}.{b}" for b in bad]
    t, v = arch["text_config"], arch["vision_config"]
    if not problems:
        ids = ("bos_token_id", "eos_token_id", "pad_token_id")
        if any(not is_int(t[k]) or not 0 <= t[k] < t["vocab_size"] for k in ids):
            problems.append("text_config token ids")
        if t["vocab_size"] < 49408 or t["max_position_embeddings"] < 77:
            problems.append("text_config (the ViT-H-14 tokenizer needs vocab_size >= 49408 and 77 positions)")
        if v["image_size"] != 224 or v["num_channels"] != 3 or v["patch_size"] > 224:
            problems.append("vision_config (images are 224x224 RGB: image_size 224, num_channels 3)")
    if problems:
        raise InputError(f"not a usable CLIPConfig: bad {', '.join(problems[:3])}")


def load_architecture(path: str | Path | None) -> dict[str, Any]:
    """The ViT-H-14 architecture, or the one of a CLIPConfig JSON file (tests use tiny ones)."""
    if path is None:
        return architecture(VIT_H_14)
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"config file {path} not found; give a transformers CLIPConfig JSON") from None
    except (OSError, ValueError) as e:
        raise InputError(f"cannot read config {path}: {e}; give a transformers CLIPConfig JSON") from None
    if not isinstance(data, dict):
        raise InputError(f"config {path} is not a JSON object; give a transformers CLIPConfig JSON")
    return architecture(data)


def to_clip_config(arch: dict[str, Any]):
    """A transformers CLIPConfig for an architecture dict (sdpa attention, as transformers uses by default)."""
    from transformers import CLIPConfig

    cfg = CLIPConfig(text_config=dict(arch["text_config"]), vision_config=dict(arch["vision_config"]),
                     projection_dim=arch["projection_dim"])
    return cfg


def dumps(arch: dict[str, Any]) -> str:
    return json.dumps(arch, sort_keys=True, separators=(",", ":"))
