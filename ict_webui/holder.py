"""Finding the model files and holding one loaded :class:`ict_core.Scorer` between generations.

Nothing is loaded at import or when the extension is merely installed: the first generation with the accordion
enabled loads the models (through ``ict_core.Scorer.load``); the Settings decide whether they then stay on their
device, move to the CPU, or are dropped."""
from __future__ import annotations

import gc
import logging
import os
import threading
from pathlib import Path
from typing import Any, Callable, Iterable

from .options import AFTER_CPU, AFTER_KEEP, AFTER_UNLOAD

log = logging.getLogger(__name__)

ICT_FILE, HP_FILE = "ict.safetensors", "hp.safetensors"     # the names `ict fetch` writes (ict_core.paths)


def _read_kind(path: Path) -> str | None:
    try:
        from ict_core import weights
        return weights.read_kind(path)
    except Exception as e:      # not ours, truncated, a pickle ...: not a candidate
        log.debug("ICT reward: %s is not a model file (%s)", path, e)
        return None


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


def find_models(dirs: Iterable[str | os.PathLike]) -> tuple[Path | None, Path | None]:
    """``(ict_path, hp_path)``: ict.safetensors / hp.safetensors first, else any .safetensors whose header says
    it is that kind; the first folder that has an ICT model wins (an HP model is looked for in it first)."""
    found: dict[str, Path] = {}
    for d in dirs:
        d = Path(d)
        if not d.is_dir():
            continue
        local: dict[str, Path] = {}
        for kind, name in (("ict", ICT_FILE), ("hp", HP_FILE)):
            if (d / name).is_file() and _read_kind(d / name) == kind:
                local[kind] = d / name
        if len(local) < 2:
            for f in sorted(d.glob("*.safetensors")):
                if f.name in (ICT_FILE, HP_FILE):
                    continue
                kind = _read_kind(f)
                if kind in ("ict", "hp") and kind not in local:
                    local[kind] = f
        if "ict" in local and "ict" not in found:
            found["ict"] = local["ict"]
            if "hp" in local:
                found["hp"] = local["hp"]
        if "hp" in local and "hp" not in found:
            found.setdefault("hp", local["hp"])
        if "ict" in found and "hp" in found:
            break
    return found.get("ict"), found.get("hp")


def missing_message(dirs: list[Path], kind: str = "ict") -> str:
    where = " or ".join(str(d) for d in dirs)
    first = dirs[0] if dirs else Path("models/ict")
    what = "ICT" if kind == "ict" else "HP"
    return (f"ICT reward: no {what} model found in {where}; images are left unscored. Install the weights with "
            f"`ict fetch --hp --dest \"{first}\"` (or `python -m ict_core fetch --hp --dest \"{first}\"` with the "
            f"webui's Python), or set the folder in Settings > ICT reward.")


def _default_loader(ict_path: Path, hp_path: Path | None, device: str, precision: str):
    from ict_core import Scorer

    return Scorer.load(ict_path, hp_path, device=device, precision=precision, cache=_open_cache())


def _open_cache():
    """The prompt embedding cache ($ICT_CACHE_DIR or ict_core's default); an accelerator, never a failure."""
    try:
        from ict_core.cache import EmbeddingCache

        return EmbeddingCache()
    except Exception as e:
        log.warning("ICT embedding cache unavailable (%s); prompts will be encoded each time", e)
        return None


class ScorerHolder:
    """One loaded scorer, reused while the files, device and precision stay the same."""

    def __init__(self, loader: Callable[[Path, Path | None, str, str], Any] | None = None):
        self._loader = loader or _default_loader
        self._scorer: Any = None
        self._key: tuple | None = None
        self._home: Any = None          # the device it was loaded on
        self.lock = threading.RLock()
        self.loads = 0                  # how many times a model was loaded (tests, logs)

    @property
    def loaded(self) -> bool:
        return self._scorer is not None

    def get(self, ict_path: Path, hp_path: Path | None, device: str, precision: str):
        key = (str(ict_path), str(hp_path) if hp_path else None, device, precision)
        with self.lock:
            if self._scorer is not None and self._key != key:
                self.unload()
            if self._scorer is None:
                log.info("ICT reward: loading %s%s (device %s, precision %s)", ict_path,
                         f" + {hp_path}" if hp_path else "", device, precision)
                self._scorer = self._loader(ict_path, hp_path, device, precision)
                self._key = key
                self._home = getattr(self._scorer, "device", None)
                self.loads += 1
            elif self._home is not None and getattr(self._scorer, "device", self._home) != self._home:
                log.info("ICT reward: moving the reward models back to %s", self._home)
                self._scorer.modules.to(self._home)
            return self._scorer

    def release(self, policy: str) -> None:
        """What to do once a generation is over (the Settings' "after a generation")."""
        with self.lock:
            if self._scorer is None or policy == AFTER_KEEP:
                return
            if policy == AFTER_CPU:
                if str(getattr(self._scorer, "device", "cpu")) != "cpu":
                    log.info("ICT reward: moving the reward models to the CPU")
                    self._scorer.modules.to("cpu")
                    _empty_cuda_cache()
            elif policy == AFTER_UNLOAD:
                self.unload()

    def unload(self) -> None:
        with self.lock:
            if self._scorer is not None:
                log.info("ICT reward: unloading the reward models")
            self._scorer = None
            self._key = None
            self._home = None
            gc.collect()
            _empty_cuda_cache()


def _empty_cuda_cache() -> None:
    try:
        import torch
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except Exception:      # pragma: no cover
        pass
