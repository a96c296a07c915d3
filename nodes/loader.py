"""ICTModelLoader: picks the weight files and hands the scoring nodes a loaded, host-managed scorer."""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path

from . import comfy_host

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp16", "bf16", "fp32")
DEVICES = ("auto", "cpu")
NONE = "none"


@dataclass
class ICTModel:
    """What flows along an ICT_MODEL link: the scorer plus ComfyUI's handle on its weights."""
    scorer: object
    patcher: object = None          # comfy ModelPatcher, None outside ComfyUI
    ict_name: str = ""
    hp_name: str | None = None
    precision: str = "auto"

    def prepare(self) -> None:
        """Put the weights on the run device (ComfyUI may have offloaded them for the diffusion model)."""
        comfy_host.load_for_inference(self.patcher)

    def describe(self) -> str:
        hp = f" + HP {self.hp_name}" if self.hp_name else ""
        return f"ICT {self.ict_name}{hp} ({self.scorer.dtype}, {self.scorer.device})"


# One entry is enough: a workflow uses one model pair, and a second entry would hold ~2.5 GB more.
_cache: dict[tuple, ICTModel] = {}
_cache_lock = threading.Lock()


def _file_key(path: Path | None) -> tuple:
    if path is None:
        return (None,)
    st = path.stat()
    return (str(path.resolve()), st.st_mtime_ns, st.st_size)


def load_model(ict_name: str, hp_name: str, precision: str, device: str) -> ICTModel:
    """Load (or reuse) a scorer; the cache key changes when a file is replaced on disk."""
    from ict_core import Scorer
    from ict_core.errors import InputError

    if precision not in PRECISIONS:
        raise InputError(f"precision '{precision}' is not one of {', '.join(PRECISIONS)}")
    if device not in DEVICES:
        raise InputError(f"device '{device}' is not one of {', '.join(DEVICES)}")
    ict_path = comfy_host.resolve_model_file(ict_name, "ict_model")
    hp_path = None if hp_name in (None, "", NONE) else comfy_host.resolve_model_file(hp_name, "hp_model")
    key = (_file_key(ict_path), _file_key(hp_path), precision, device)
    with _cache_lock:
        hit = _cache.get(key)
        if hit is not None:
            log.info("ICT model reused from memory: %s", hit.describe())
            return hit
        _cache.clear()  # drop the previous pair before loading another
        plan = comfy_host.plan_device(device)
        if plan is None:  # no ComfyUI: ict_core places the model itself
            scorer = Scorer.load(ict_path, hp_path, device=device, precision=precision,
                                 cache=comfy_host.open_cache())
            patcher = None
        else:  # weights wait on the offload device, in the precision of the device they run on
            load_device, offload_device = plan
            scorer = Scorer.load(ict_path, hp_path, device=offload_device, run_device=load_device,
                                 precision=precision, cache=comfy_host.open_cache())
            patcher = comfy_host.make_patcher(scorer.modules, load_device, offload_device)
        model = ICTModel(scorer, patcher, ict_name, None if hp_path is None else hp_name, precision)
        _cache[key] = model
        log.info("ICT model loaded: %s", model.describe())
        return model


def clear_cache() -> None:
    with _cache_lock:
        _cache.clear()


class ICTModelLoader:
    """Loads the ICT model (and optionally the HP model) from ComfyUI's models/ict folder."""

    CATEGORY = "ICT reward"
    RETURN_TYPES = ("ICT_MODEL",)
    RETURN_NAMES = ("model",)
    FUNCTION = "load"
    DESCRIPTION = ("Loads converted ICT/HP reward models (.safetensors in models/ict). The model is kept in memory "
                   "between runs and offloaded by ComfyUI when the diffusion model needs the memory.")

    @classmethod
    def INPUT_TYPES(cls):
        files = comfy_host.list_model_files()
        return {"required": {
            "ict_model": (files, {"tooltip": "converted ICT model (`ict convert` / `ict fetch`)"}),
            "hp_model": ([NONE] + files, {"default": NONE,
                                         "tooltip": "optional HP model; needed for score_by hp, ict*hp, group"}),
            "precision": (list(PRECISIONS), {"default": "auto",
                                             "tooltip": "auto = fp32, the official scores; fp16/bf16 are faster on a GPU "
                                                        "(bf16 also on a CPU with native bf16) and differ slightly"}),
            "device": (list(DEVICES), {"default": "auto",
                                       "tooltip": "auto: ComfyUI's device (respects --cpu, --lowvram, --highvram)"}),
        }}

    @classmethod
    def IS_CHANGED(cls, ict_model, hp_model, precision, device):
        """Re-run when a file is replaced on disk under the same name."""
        try:
            paths = [comfy_host.resolve_model_file(ict_model, "ict_model")]
            if hp_model not in (None, "", NONE):
                paths.append(comfy_host.resolve_model_file(hp_model, "hp_model"))
            return repr([_file_key(p) for p in paths] + [precision, device])
        except Exception:  # the run itself reports the problem clearly
            return float("nan")

    def load(self, ict_model, hp_model, precision, device):
        return (load_model(ict_model, hp_model, precision, device),)
