"""What every `ict` command that loads models shares: the model options, where the models are, the
embedding cache of a run and the progress bar. Imported by ict_core.cli and ict_core.cache_cli alike."""
from __future__ import annotations

import argparse
import logging
import sys

from . import paths
from .errors import ICTError, InputError

log = logging.getLogger("ict_core")

#: How long `ict index` and `ict cache clear` wait for another process's write by default (seconds).
LOCK_WAIT = 120.0


def model_path(given: str | None, kind: str, required: bool) -> str | None:
    """--model / --hp-model as given, else the fetched file of that kind; InputError when required and absent."""
    if given:
        return given
    default = paths.default_model(kind)
    if default.exists():
        return str(default)
    if required:
        raise InputError(f"no ICT model: pass --model FILE.safetensors, or run `ict fetch` to put one in {default} "
                         f"(set ${paths.MODELS_ENV} to use another folder)")
    return None


def open_cache(args):
    """The embedding cache for this run, or None with --no-cache or when it cannot be had."""
    if getattr(args, "no_cache", False):
        return None
    try:
        from .cache import EmbeddingCache
    except ImportError as e:  # the cache is an accelerator, never a point of failure
        log.warning("embedding cache unavailable (%s); scoring without it", e)
        return None
    return EmbeddingCache(getattr(args, "cache_dir", None))


class Progress:
    """tqdm on stderr, adapted to the engine's progress(done, total) callback."""

    def __init__(self, quiet: bool, desc: str):
        self.quiet, self.desc, self.bar = quiet, desc, None

    def __call__(self, done: int, total: int) -> None:
        if self.quiet:
            return
        if self.bar is None:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=self.desc, unit="img", file=sys.stderr, leave=False)
        self.bar.n = done
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def shown(default, *args) -> str:
    """A default folder for --help; the error itself is raised only by a command that needs it."""
    try:
        return str(default(*args))
    except ICTError:
        return "none: set HOME"


def seconds(text: str) -> float:
    """An argparse type: a number of seconds, 0 or more."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds (0 or more)")
    return value


def lock_wait_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lock-wait", type=seconds, default=LOCK_WAIT, metavar="SECONDS",
                   help=f"how long to wait while another process writes to the cache (default {LOCK_WAIT:g}); "
                        f"past it nothing more is written and the command fails")


def model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help=f"converted ICT .safetensors (default: {shown(paths.default_model, 'ict')})")
    p.add_argument("--hp-model", help="converted HP .safetensors (default: the fetched one, if present)")
    p.add_argument("--no-hp", action="store_true", help="do not load the HP model even if one is installed")
    p.add_argument("--device", default="auto", help="auto|cpu|cuda (default auto)")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "fp16", "bf16"),
                   help="auto = fp32, the official numbers; fp16/bf16 are faster on CUDA")
    p.add_argument("--config", help="transformers CLIPConfig JSON, to check the files' architecture")
    p.add_argument("--cache-dir", help=f"embedding cache folder (default ${paths.CACHE_ENV} or "
                                       f"{shown(paths.default_cache_dir)})")
    p.add_argument("--no-cache", action="store_true", help="do not use the embedding cache")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
