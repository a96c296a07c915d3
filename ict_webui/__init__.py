"""Host-facing logic of the Automatic1111 / Forge extension, kept apart from the webui so tests can drive it.

Nothing here imports ``modules.*`` (the webui) and nothing loads a model at import time; ``scripts/ict_reward.py``
is the thin webui Script that translates the webui's hooks into calls on :class:`WebuiReward`.
"""
from ict_core.prompt_syntax import clean_prompt

from .align import apply_order, compact
from .holder import ScorerHolder, find_models, search_models
from .infotext import (
                       HP_INFOTEXT_KEY,
                       HP_PNG_KEY,
                       ICT_INFOTEXT_KEY,
                       ICT_PNG_KEY,
                       RECORD_PNG_KEY,
                       png_keys_from_infotext,
                       scores_from_infotext,
)
from .options import (
                       AFTER_CHOICES,
                       BY_CHOICES,
                       DEVICE_CHOICES,
                       MODE_CHOICES,
                       OPTIONS,
                       PRECISION_CHOICES,
                       RunArgs,
                       Settings,
)
from .reward import WebuiReward

__all__ = [
    "apply_order", "compact", "HP_INFOTEXT_KEY", "HP_PNG_KEY", "ICT_INFOTEXT_KEY", "ICT_PNG_KEY", "RECORD_PNG_KEY",
    "png_keys_from_infotext", "scores_from_infotext", "AFTER_CHOICES", "DEVICE_CHOICES", "OPTIONS",
    "PRECISION_CHOICES", "RunArgs", "Settings", "BY_CHOICES", "MODE_CHOICES", "ScorerHolder", "find_models",
    "search_models",
    "clean_prompt", "WebuiReward",
]
