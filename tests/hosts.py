"""The real hosts that the real-host tests run against, read once from the environment.

One place for the environment variables (``.ci/run`` sets them for each ComfyUI version it lays out):

- ``COMFYUI_DIR``: a ComfyUI checkout (its ``main.py``); without it every real-host test skips.
- ``COMFYUI_PYTHON``: the Python that runs that ComfyUI (default: this interpreter).
- ``COMFYUI_CHECKPOINT`` or ``COMFYUI_SD15_CKPT``: an SD1.5 ``.safetensors`` (random weights do:
  ``../shared/hosts/make_sd15_comfy.py``).
- ``COMFYUI_FRONTEND_ROOT``: the ``static`` folder of a newer ``comfyui-frontend-package`` for
  ``--front-end-root`` (the browser test's second frontend).
- ``ICT_CHROMIUM``: a Chromium for the browser test (default: ``chromium`` on PATH, as Debian installs it).
- ``ICT_REQUIRE_HOSTS=1``: a real-host test that skips fails instead (CI sets it once it laid the hosts out).

Real-host tests are the files named ``test_comfyui_*.py`` and ``test_browser*.py``.
"""
from __future__ import annotations

import fnmatch
import os
import re
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

REAL_HOST_FILES = ("test_comfyui_*.py", "test_browser*.py")
REQUIRE_ENV = "ICT_REQUIRE_HOSTS"


def is_real_host_test(path: str | os.PathLike) -> bool:
    """True for a test file that needs a real host (by its name)."""
    name = Path(path).name
    return any(fnmatch.fnmatch(name, pattern) for pattern in REAL_HOST_FILES)


def hosts_required() -> bool:
    return os.environ.get(REQUIRE_ENV, "") not in ("", "0")


def _path(value: str | None) -> Path | None:
    return Path(value).expanduser() if value else None


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""


@dataclass(frozen=True)
class ComfyUI:
    """A ComfyUI checkout and what the tests run it with."""

    dir: Path | None
    python: str
    checkpoint: Path | None
    frontend_root: Path | None
    chromium: str | None

    @classmethod
    def from_env(cls, env: dict | None = None) -> ComfyUI:
        env = os.environ if env is None else env
        chromium = env.get("ICT_CHROMIUM") or "chromium"
        return cls(dir=_path(env.get("COMFYUI_DIR")),
                   python=env.get("COMFYUI_PYTHON") or sys.executable,
                   checkpoint=_path(env.get("COMFYUI_CHECKPOINT") or env.get("COMFYUI_SD15_CKPT")),
                   frontend_root=_path(env.get("COMFYUI_FRONTEND_ROOT")),
                   chromium=shutil.which(chromium) or (chromium if os.access(chromium, os.X_OK) else None))

    @property
    def version(self) -> str | None:
        """ComfyUI's own version (``comfyui_version.py``), e.g. ``0.33.0``."""
        if self.dir is None:
            return None
        m = re.search(r"""__version__\s*=\s*["']([^"']+)""", _read(self.dir / "comfyui_version.py"))
        return m.group(1) if m else None

    @property
    def frontend_version(self) -> str | None:
        """The frontend that this ComfyUI pins in its requirements.txt (what it serves by default)."""
        if self.dir is None:
            return None
        m = re.search(r"^comfyui-frontend-package==(\S+)", _read(self.dir / "requirements.txt"), re.M)
        return m.group(1) if m else None

    @property
    def newer_frontend_version(self) -> str | None:
        """The version of the frontend in ``frontend_root`` (from the package's dist-info beside it)."""
        if self.frontend_root is None:
            return None
        for info in sorted(self.frontend_root.parent.parent.glob("comfyui_frontend_package-*.dist-info")):
            return info.name[len("comfyui_frontend_package-"):-len(".dist-info")]
        return None

    def missing(self) -> str | None:
        """One line saying why this ComfyUI cannot be run, or None when it can."""
        if self.dir is None:
            return ("COMFYUI_DIR is not set: point it at a ComfyUI checkout (0.33.0 and 0.3.64 tested) and "
                    "COMFYUI_PYTHON at a Python with its requirements to run the real-host tests")
        if not (self.dir / "main.py").is_file():
            return f"COMFYUI_DIR={self.dir} has no main.py"
        return None

    def missing_checkpoint(self) -> str | None:
        """One line saying why no SD1.5 checkpoint is at hand, or None."""
        if self.checkpoint is None:
            return ("COMFYUI_CHECKPOINT is not set to an SD1.5 .safetensors "
                    "(../shared/hosts/make_sd15_comfy.py makes a random one)")
        if not self.checkpoint.is_file():
            return f"COMFYUI_CHECKPOINT={self.checkpoint} is not a file"
        return None

    def missing_browser(self) -> str | None:
        """One line saying why the browser test cannot run here, or None."""
        if self.chromium is None:
            return "no Chromium: install Debian's `chromium` (or set ICT_CHROMIUM to one) for the browser test"
        try:
            import playwright  # noqa: F401
        except ImportError:
            return "playwright is not installed: `pip install playwright` (the browser comes from the system)"
        return None

    def missing_frontend(self) -> str | None:
        """One line saying why the newer frontend is not at hand, or None."""
        if self.frontend_root is None:
            return ("COMFYUI_FRONTEND_ROOT is not set: extract the newest comfyui-frontend-package and point it "
                    "at its comfyui_frontend_package/static folder")
        if not (self.frontend_root / "index.html").is_file():
            return f"COMFYUI_FRONTEND_ROOT={self.frontend_root} has no index.html"
        return None

    def describe(self) -> str:
        """One line for the test session's header."""
        reason = self.missing()
        if reason:
            return f"real hosts: none ({reason})"
        parts = [f"ComfyUI {self.version or '?'} (frontend {self.frontend_version or '?'}) at {self.dir}",
                 f"python {self.python}"]
        parts.append(f"SD1.5 checkpoint {self.checkpoint}" if not self.missing_checkpoint()
                     else "no SD1.5 checkpoint")
        if not self.missing_frontend():
            parts.append(f"newer frontend {self.newer_frontend_version or '?'} at {self.frontend_root}")
        parts.append(f"chromium {self.chromium}" if self.chromium else "no chromium")
        return "real hosts: " + "; ".join(parts)


COMFYUI = ComfyUI.from_env()
