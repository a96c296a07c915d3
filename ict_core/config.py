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

#: A tiny but complete CLIP (the real vocabulary, 77 positions, 224 px input) for tests and the
#: benchmarks' smoke runs: random weights of this size exercise every code path in seconds.
TINY = {
    "projection_dim": 16,
    "text_config": {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 2, "num_hidden_layers": 2,
                    "vocab_size": 49408, "max_position_embeddings": 77, "hidden_act": "gelu",
                    "layer_norm_eps": 1e-5, "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1},
    "vision_config": {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 2, "num_hidden_layers": 2,
                      "patch_size": 32, "image_size": 224, "num_channels": 3, "hidden_act": "gelu",
                      "layer_norm_eps": 1e-5},
}


def architecture(cfg: dict[str, Any]) -> dict[str, Any]:
    """Reduce a CLIPConfig dict (possibly a full config.json) to the canonical fields that define the weights."""
    try:
        text, vision = cfg.get("text_config") or {}, cfg.get("vision_config") or {}
        base_t, base_v = VIT_H_14["text_config"], VIT_H_14["vision_config"]
        return {
            "projection_dim": int(cfg.get("projection_dim", VIT_H_14["projection_dim"])),
            "text_config": {k: text.get(k, base_t[k]) for k in _TEXT_KEYS},
            "vision_config": {k: vision.get(k, base_v[k]) for k in _VISION_KEYS},
        }
    except (AttributeError, TypeError, ValueError) as e:
        raise InputError(f"not a CLIPConfig: {e}; give a transformers CLIPConfig JSON (config.json)") from e


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
