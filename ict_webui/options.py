"""What the user chooses: the per-generation accordion values (:class:`RunArgs`) and the Settings section
(:class:`Settings`, described by :data:`OPTIONS` so the webui script can register them without this module
importing the webui)."""
from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

MODE_ANNOTATE, MODE_RERANK, MODE_KEEP, MODE_MIN = "annotate", "rerank", "keep best K", "min score"
MODE_CHOICES = (MODE_ANNOTATE, MODE_RERANK, MODE_KEEP, MODE_MIN)
BY_CHOICES = ("ict", "hp", "ict*hp", "group")      # same names as ict_core.ranking.BY
NEEDS_HP = ("hp", "ict*hp", "group")

DEVICE_CHOICES = ("auto", "cuda", "cpu")
PRECISION_CHOICES = ("auto", "fp16", "bf16", "fp32")
AFTER_KEEP, AFTER_CPU, AFTER_UNLOAD = "keep loaded", "move to CPU", "unload"
AFTER_CHOICES = (AFTER_KEEP, AFTER_CPU, AFTER_UNLOAD)


@dataclass(frozen=True)
class Option:
    """One entry of the webui's Settings section (rendered by the script as ``shared.OptionInfo``)."""
    key: str
    default: Any
    label: str
    choices: tuple[str, ...] | None = None      # None: a text box
    info: str = ""


SECTION = ("ict_reward", "ICT reward")
OPTIONS: tuple[Option, ...] = (
    Option("ict_reward_models_dir", "", "Folder with the ICT / HP model files (.safetensors)",
           info="empty: the webui's models/ict folder; ict_core's default folder (where `ict fetch` writes) is "
                "searched too"),
    Option("ict_reward_device", "auto", "Device for the reward models", DEVICE_CHOICES,
           info="auto: the GPU when there is one"),
    Option("ict_reward_precision", "auto", "Precision of the reward models", PRECISION_CHOICES,
           info="auto: fp32; fp16 / bf16 halve the memory on a GPU (a CPU uses fp32, or bf16 where it runs it "
                "natively)"),
    Option("ict_reward_after", AFTER_CPU, "Between scorings, the reward models", AFTER_CHOICES,
           info="A1111: 'move to CPU' gives the GPU back after each scoring (the weights wait in RAM, ~6.4 GB for an "
                "fp32 ICT+HP pair, 3.2 GB in fp16; each scoring first copies them to the GPU); 'keep loaded' leaves "
                "them on the GPU (fastest, but that VRAM is gone for the generation: only for large cards); "
                "'unload' also drops them from RAM after each generation (the next one reads them from disk again). "
                "Forge: its memory manager moves them in and out of the GPU as it does its own models, whatever is "
                "chosen here; only 'unload' changes something (RAM)"),
)


@dataclass(frozen=True)
class Settings:
    models_dir: str          # resolved folder (never empty)
    device: str
    precision: str
    after: str

    @classmethod
    def from_opts(cls, get: Callable[[str, Any], Any], webui_models_path: str | None) -> Settings:
        """``get(key, default)`` reads one option (e.g. ``lambda k, d: getattr(shared.opts, k, d)``)."""
        values = {o.key: get(o.key, o.default) for o in OPTIONS}
        folder = str(values["ict_reward_models_dir"] or "").strip()
        if not folder:
            folder = os.path.join(webui_models_path or "models", "ict")
        folder = os.path.expanduser(folder)

        def pick(key: str, choices: tuple[str, ...], default: str) -> str:
            v = str(values[key] or default).strip()
            if v not in choices:
                log.warning("ICT reward: setting %s=%r is not one of %s; using %r", key, v, choices, default)
                return default
            return v

        return cls(models_dir=folder,
                   device=pick("ict_reward_device", DEVICE_CHOICES, "auto"),
                   precision=pick("ict_reward_precision", PRECISION_CHOICES, "auto"),
                   after=pick("ict_reward_after", AFTER_CHOICES, AFTER_CPU))


@dataclass(frozen=True)
class RunArgs:
    """The accordion's values, in the order ``ui()`` returns its components."""
    enabled: bool = False
    mode: str = MODE_ANNOTATE
    k: int = 1
    min_score: float = 0.0
    by: str = "ict*hp"
    use_hp: bool = True

    @property
    def needs_hp(self) -> bool:
        return self.use_hp or self.by in NEEDS_HP

    @classmethod
    def from_values(cls, *values: Any) -> RunArgs:
        """Tolerant of what gradio and the API send: strings for numbers, missing trailing values, junk."""
        d = cls()
        v = list(values) + [None] * 6
        enabled, mode, k, min_score, by, use_hp = v[:6]
        mode = mode if mode in MODE_CHOICES else d.mode
        by = by if by in BY_CHOICES else d.by
        try:
            k = max(1, int(float(k)))
        except (TypeError, ValueError):
            k = d.k
        try:
            min_score = float(min_score)
            if not math.isfinite(min_score):
                raise ValueError
        except (TypeError, ValueError):
            min_score = d.min_score
        return cls(enabled=bool(enabled) and str(enabled).lower() not in ("false", "0", "off"),
                   mode=mode, k=k, min_score=min_score, by=by,
                   use_hp=d.use_hp if use_hp is None else (bool(use_hp) and str(use_hp).lower() not in ("false", "0")))
