"""Where the reward models live between scorings: following the host's own memory rules.

- Forge (main and Neo: ``backend.memory_management``; Classic: ``ldm_patched.modules.model_management``) has a
  memory manager that moves every model in and out of the GPU. The reward models are handed to it as its own
  built-in modules are (BLIP / DeepDanbooru in Forge, CLIP vision in Classic): wrapped in the host's
  ``ModelPatcher`` with the host's auxiliary-encoder devices (``text_encoder_device()`` /
  ``text_encoder_offload_device()``), and ``load_models_gpu([...], memory_required=...)`` before each scoring; the
  manager then offloads them when the next model needs the room. Nothing is moved by hand.
- Automatic1111 has no such manager: the weights wait in RAM and go to the GPU for each scoring; by default the GPU
  is given back right after (``move to CPU``); ``keep loaded`` leaves them on the GPU (large cards).

Nothing here imports the webui at import time; :func:`host_placement` looks for the host when asked.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from .options import AFTER_KEEP

log = logging.getLogger(__name__)

NO_CUDA = ("Settings > ICT reward > Device is 'cuda', but torch sees no CUDA GPU here; set it to 'auto' (the "
           "webui's device) or 'cpu'.")
CPU = torch.device("cpu")


def activation_bytes(scorer: Any, chunk: int | None = None) -> int:
    """The memory one chunk of images needs while the vision towers run (the ``memory_required`` a host's manager
    keeps free next to the weights): the engine's per-image estimate (:func:`ict_core.modeling.activation_bytes`)
    times the chunk the scorer runs."""
    from ict_core.modeling import activation_bytes as per_image

    try:
        return per_image(scorer.modules, scorer.dtype) * int(chunk or scorer._chunk())
    except Exception as e:       # an unknown layout: the managers' own default minimum is 1 GiB
        log.debug("ICT reward: no activation estimate (%s)", e)
        return 1 << 30


class TorchPlacement:
    """Automatic1111 (or any host without a memory manager): weights in RAM, on the GPU while scoring."""

    name = "the webui's device (no memory manager)"

    def __init__(self, host_device: Callable[[], Any] | None = None):
        self.host_device = host_device       # the webui's device for this task (honours --use-cpu)

    def devices(self, setting: str) -> tuple[torch.device, torch.device]:
        """``(where the weights wait, where they score)``; raises ICTError with a webui-worded message."""
        from ict_core import ICTError

        if setting == "cpu":
            return CPU, CPU
        if setting == "cuda":
            if not torch.cuda.is_available():
                raise ICTError(NO_CUDA)
            return CPU, torch.device("cuda")
        run = None
        if self.host_device is not None:
            try:
                run = torch.device(self.host_device())
            except Exception as e:       # pragma: no cover - an odd host
                log.debug("ICT reward: the webui's device is unknown (%s)", e)
        if run is None:
            run = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return CPU, run

    def adopt(self, scorer: Any, load: torch.device, offload: torch.device) -> Any:
        return None

    def to_run(self, scorer: Any, handle: Any, run: torch.device) -> None:
        if scorer.device != run:
            log.info("ICT reward: moving the reward models to %s", run)
            scorer.modules.to(run)

    def after_scoring(self, scorer: Any, handle: Any, policy: str) -> None:
        """``keep loaded``: stay on the GPU; anything else: give the GPU back now (weights stay in RAM)."""
        if policy != AFTER_KEEP and scorer.device.type != "cpu":
            log.info("ICT reward: giving the GPU back (the reward models wait in RAM)")
            scorer.modules.to(CPU)
            empty_cuda_cache()

    def forget(self, scorer: Any, handle: Any) -> None:
        pass


class ManagedPlacement:
    """Forge: the host's memory manager (``mm``) and model patcher class place the models."""

    def __init__(self, mm: Any, patcher_cls: Any, name: str):
        self.mm, self.patcher_cls, self.name = mm, patcher_cls, name

    def devices(self, setting: str) -> tuple[torch.device, torch.device]:
        from ict_core import ICTError

        if setting == "cpu":
            return CPU, CPU
        offload = torch.device(self.mm.text_encoder_offload_device())
        if setting == "cuda":
            run = torch.device(self.mm.get_torch_device())
            if run.type != "cuda":
                raise ICTError(NO_CUDA)
            return offload, run
        return offload, torch.device(self.mm.text_encoder_device())

    def adopt(self, scorer: Any, load: torch.device, offload: torch.device) -> Any:
        return self.patcher_cls(scorer.modules, load_device=load, offload_device=offload)

    def to_run(self, scorer: Any, handle: Any, run: torch.device) -> None:
        self.mm.load_models_gpu([handle], memory_required=activation_bytes(scorer))
        elsewhere = _devices_not(scorer, run)
        if elsewhere:                # the manager kept part of it elsewhere: plain layers cannot run split
            log.info("ICT reward: %s left the reward models on %s; moving them to %s", self.name,
                     ", ".join(sorted(map(str, elsewhere))), run)
            scorer.modules.to(run)

    def after_scoring(self, scorer: Any, handle: Any, policy: str) -> None:
        pass                         # the manager offloads them when the next model needs the room

    def forget(self, scorer: Any, handle: Any) -> None:
        unload = getattr(self.mm, "unload_model_clones", None)
        if handle is not None and callable(unload):
            unload(handle)
        soft = getattr(self.mm, "soft_empty_cache", None)
        if callable(soft):
            soft()


def _same(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def _devices_not(scorer: Any, run: torch.device) -> set:
    """The devices other than ``run`` holding the scorer's weights. Looked up on the tensors themselves: Forge Neo's
    ModelPatcher (as ComfyUI's) sets ``model.device`` to the load device even when it left layers behind."""
    try:
        tensors = [*scorer.modules.parameters(), *scorer.modules.buffers()]
    except Exception:            # pragma: no cover - not a torch module
        return set() if _same(scorer.device, run) else {scorer.device}
    return {t.device for t in tensors if not _same(t.device, run)}


def host_placement(host_device: Callable[[], Any] | None = None):
    """The placement for the running webui: Forge's manager when it has one, else plain torch (A1111)."""
    try:
        from backend import memory_management as mm  # Forge main, Forge Neo
        from backend.patcher.base import ModelPatcher
        return ManagedPlacement(mm, ModelPatcher, "Forge's memory manager (backend.memory_management)")
    except ImportError:
        pass
    try:
        import ldm_patched.modules.model_management as mm  # Forge Classic (and Forge before 2024-08)
        from ldm_patched.modules.model_patcher import ModelPatcher
        return ManagedPlacement(mm, ModelPatcher, "Forge's memory manager (ldm_patched model_management)")
    except ImportError:
        pass
    return TorchPlacement(host_device)


def empty_cuda_cache() -> None:
    try:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:      # pragma: no cover
        pass
