"""Finding the model files and holding one loaded :class:`ict_core.Scorer` between generations.

Nothing is loaded at import or when the extension is merely installed: the first generation with the accordion
enabled loads the models (through ``ict_core.Scorer.load``); where they wait between scorings follows the host
(:mod:`.placement`) and the Settings."""
from __future__ import annotations

import gc
import logging
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ict_core.paths import HP_FILE, ICT_FILE
from ict_core.weights import PICKLE_SUFFIXES

from . import hints
from .download import WHERE
from .options import AFTER_UNLOAD
from .placement import TorchPlacement, empty_cuda_cache

log = logging.getLogger(__name__)


def _read_kind(path: Path) -> tuple[str | None, str | None]:
    """``(kind, None)`` for a converted model file, else ``(None, the engine's one-line reason)``, its suggested
    command written as it runs in this webui (:func:`.hints.for_refused`)."""
    try:
        from ict_core import weights
        return weights.read_kind(path), None
    except Exception as e:      # not ours, truncated, a pickle ...
        log.debug("ICT reward: %s is not a model file (%s)", path, e)
        return None, hints.for_refused(path, str(e).splitlines()[0] if str(e) else type(e).__name__)


@dataclass
class Found:
    """What the model folders hold: the files to load, and why a file that looked meant for us cannot be used."""
    ict: Path | None = None
    hp: Path | None = None
    ict_problem: str | None = None      # the engine's message about ict.safetensors (or a pickle) when no ICT loads
    hp_problem: str | None = None


def search_dirs(models_dir: str | os.PathLike) -> list[Path]:
    """The configured folder, then ict_core's default models folder (where a plain `ict fetch` writes)."""
    out = [Path(models_dir)]
    try:
        from ict_core import paths
        out.append(Path(paths.default_models_dir()))
    except Exception as e:   # pragma: no cover - ict_core missing is reported when loading
        log.debug("ICT reward: no ict_core default folder (%s)", e)
    uniq: list[Path] = []
    for d in out:
        if d not in uniq:
            uniq.append(d)
    return uniq


def search_models(dirs: Iterable[str | os.PathLike]) -> Found:
    """ict.safetensors / hp.safetensors first, else any .safetensors whose header says it is that kind; the first
    folder that has an ICT model wins (an HP model is looked for in it first). A file named ict.safetensors /
    hp.safetensors that the engine refuses (truncated, not converted, a pickle, the other kind), or a pickle
    checkpoint lying in the folder, is remembered with the engine's message, shown when no usable file is found."""
    out = Found()
    for d in dirs:
        d = Path(d)
        if not d.is_dir():
            continue
        local: dict[str, Path] = {}
        for kind, name in (("ict", ICT_FILE), ("hp", HP_FILE)):
            if not (d / name).is_file():
                continue
            got, problem = _read_kind(d / name)
            if got == kind:
                local[kind] = d / name
            else:
                problem = problem or (f"{d / name} is an {str(got).upper()} model, not the {kind.upper()} model; "
                                      f"rename it")
                if getattr(out, f"{kind}_problem") is None:
                    setattr(out, f"{kind}_problem", problem)
        if len(local) < 2:
            for f in sorted(d.glob("*.safetensors")):
                if f.name in (ICT_FILE, HP_FILE):
                    continue
                kind, _ = _read_kind(f)
                if kind in ("ict", "hp") and kind not in local:
                    local[kind] = f
        if out.ict_problem is None and "ict" not in local:
            pickles = sorted(f for f in d.iterdir() if f.suffix.lower() in PICKLE_SUFFIXES and f.is_file())
            if pickles:
                _, out.ict_problem = _read_kind(pickles[0])
        if "ict" in local and out.ict is None:
            out.ict = local["ict"]
            if "hp" in local:
                out.hp = local["hp"]
        if "hp" in local and out.hp is None:
            out.hp = local["hp"]
        if out.ict is not None and out.hp is not None:
            break
    return out


def find_models(dirs: Iterable[str | os.PathLike]) -> tuple[Path | None, Path | None]:
    """``(ict_path, hp_path)`` of :func:`search_models`."""
    found = search_models(dirs)
    return found.ict, found.hp


def missing_message(dirs: list[Path], kind: str = "ict") -> str:
    where = " or ".join(str(d) for d in dirs)
    first = dirs[0] if dirs else Path("models/ict")
    what = "ICT" if kind == "ict" else "HP"
    return (f"ICT reward: no {what} model found in {where}; images are left unscored. To install the official "
            f"weights press {WHERE}, or run {hints.fetch_hint(first)} (with no network here: fetch them on a machine "
            f"with network and copy {ICT_FILE} and {HP_FILE} into {first}). Another folder can be set in Settings > "
            f"ICT reward.")


def _default_loader(ict_path: Path, hp_path: Path | None, device: Any, precision: str, run_device: Any = None):
    from ict_core import Scorer

    return Scorer.load(ict_path, hp_path, device=device, precision=precision, cache=_open_cache(),
                       run_device=run_device)


def _open_cache():
    """The prompt embedding cache ($ICT_CACHE_DIR or ict_core's default); an accelerator, never a failure."""
    try:
        from ict_core.cache import EmbeddingCache

        return EmbeddingCache()
    except Exception as e:
        log.warning("ICT embedding cache unavailable (%s); prompts will be encoded each time", e)
        return None


class ScorerHolder:
    """One loaded scorer, reused while the files, device and precision stay the same. Where it lives between
    scorings is the host's business (:mod:`.placement`): the weights are loaded where they wait (RAM, or Forge's
    offload device) and go to the scoring device through :meth:`use`."""

    def __init__(self, loader: Callable[..., Any] | None = None, placement: Any = None):
        self._loader = loader or _default_loader
        self.placement = placement if placement is not None else TorchPlacement()
        self._scorer: Any = None
        self._handle: Any = None        # the host's wrapper (Forge's ModelPatcher), None in A1111
        self._run: Any = None           # the device it scores on
        self._key: tuple | None = None
        self.lock = threading.RLock()
        self.loads = 0                  # how many times a model was loaded (tests, logs)

    @property
    def loaded(self) -> bool:
        return self._scorer is not None

    def get(self, ict_path: Path, hp_path: Path | None, device: str, precision: str):
        """The scorer, on its scoring device; raises ICTError (bad file, no such device) with a one-line message."""
        key = (str(ict_path), str(hp_path) if hp_path else None, device, precision)
        with self.lock:
            if self._scorer is not None and self._key != key:
                self.unload()
            if self._scorer is None:
                wait, run = self.placement.devices(device)
                log.info("ICT reward: loading %s%s (scoring on %s, waiting on %s, precision %s, placed by %s)",
                         ict_path, f" + {hp_path}" if hp_path else "", run, wait, precision, self.placement.name)
                scorer = self._loader(ict_path, hp_path, wait, precision, run)
                self._handle = self.placement.adopt(scorer, run, wait)
                self._scorer, self._run, self._key = scorer, run, key
                self.loads += 1
            self.placement.to_run(self._scorer, self._handle, self._run)
            return self._scorer

    def done_scoring(self, policy: str) -> None:
        """After each scoring: A1111 gives the GPU back unless the Settings say "keep loaded"; Forge's manager
        decides itself."""
        with self.lock:
            if self._scorer is not None:
                self.placement.after_scoring(self._scorer, self._handle, policy)

    def release(self, policy: str) -> None:
        """Once a generation is over: "unload" drops the weights from RAM too."""
        with self.lock:
            if self._scorer is None:
                return
            if policy == AFTER_UNLOAD:
                self.unload()
            else:
                self.placement.after_scoring(self._scorer, self._handle, policy)

    def unload(self) -> None:
        """Drop the models and give their memory back to the OS (see :func:`give_back_memory`)."""
        with self.lock:
            if self._scorer is None:
                return
            log.info("ICT reward: unloading the reward models")
            try:
                self.placement.forget(self._scorer, self._handle)
            except Exception as e:      # pragma: no cover - a host's manager refusing
                log.debug("ICT reward: the host's manager could not forget the models (%s)", e)
            self._scorer = self._handle = self._run = self._key = None
            give_back_memory()
            empty_cuda_cache()


def give_back_memory() -> bool:
    """Free the unloaded weights (and the tokenizer's tables), then return the freed heap to the OS.

    The models' modules hold reference cycles: a collection frees them. glibc keeps freed blocks below its
    (adaptive, up to 32 MB) mmap threshold in the process's heaps, so the many 5-30 MB tensors of a freed model
    would stay in the server's RSS; ``malloc_trim(0)`` returns them (as the ComfyUI nodes do). True when trimmed
    (Linux with glibc); elsewhere (musl, macOS, Windows) the allocator is left as it is."""
    from ict_core import text
    from ict_core.memory import trim_heap

    text.release()
    gc.collect()
    return trim_heap()
