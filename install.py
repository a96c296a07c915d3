"""Install what requirements.txt lists and this Python does not have yet.

Run by both hosts with their own interpreter:
- ComfyUI-Manager runs ``python install.py`` in this folder after cloning / updating the node pack;
- Automatic1111 / Forge run ``install.py`` of each extension at start-up (``launch_utils.run_extension_installer``)
  with the webui's root on PYTHONPATH, so ``launch.run_pip`` is used there (it honours the webui's
  ``--skip-install`` and index URL).

torch, torchvision and torchaudio are never installed, upgraded or downgraded: they come from the host. They are
skipped, and while the rest installs pip gets a constraints file pinning the versions present, so no dependency
can pull a different torch in.

Under the webui, the packages it pins (Pillow, numpy, transformers, open-clip-torch, safetensors, ...; A1111 and
Forge main pin in ``requirements_versions.txt``, Forge Classic and Neo in ``requirements.txt``) are the webui's
too: the webui re-installs its pins at every start, so changing them would flip-flop on each launch. They are
left as they are (pinned like torch) and a warning says when one is older than this project asks for. Model
weights are not downloaded here (see the hint printed at the end).
"""
from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
PROTECTED = ("torch", "torchvision", "torchaudio")
WEIGHTS_HINT = ("ICT reward: model weights are not installed by this script. Get them once with "
                "`python -m ict_core fetch --hp --dest <folder>` (run in this folder with the host's Python), "
                "where <folder> is models/ict of ComfyUI or of the webui; see README.")

log = logging.getLogger("ict_reward.install")

try:        # packaging ships with pip / setuptools almost everywhere; without it versions are not compared
    from packaging.markers import Marker
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.specifiers import SpecifierSet
except Exception:  # pragma: no cover - exercised by monkeypatching in the tests
    Marker = Requirement = SpecifierSet = None
    InvalidRequirement = ValueError


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class Req:
    line: str          # as written (what is handed to pip)
    name: str          # canonical project name
    specifier: str     # e.g. ">=4.40,<6"
    marker: str | None


_SIMPLE = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(\[[^\]]*\])?\s*([^;]*?)\s*(?:;\s*(.*))?$")


def parse_requirements(text: str) -> list[Req]:
    """Requirement lines only: comments, blank lines, pip options (-r, -e, --index-url ...) and URLs are skipped."""
    out: list[Req] = []
    for raw in text.splitlines():
        line = re.split(r"(?:^|\s)#", raw, maxsplit=1)[0].strip()
        if not line or line.startswith("-") or "://" in line and "@" not in line:
            continue
        if Requirement is not None:
            try:
                r = Requirement(line)
            except InvalidRequirement:
                log.warning("install.py: cannot read requirement %r; skipped", line)
                continue
            out.append(Req(line, canonical(r.name), str(r.specifier), str(r.marker) if r.marker else None))
            continue
        m = _SIMPLE.match(line)
        if not m:
            log.warning("install.py: cannot read requirement %r; skipped", line)
            continue
        out.append(Req(line, canonical(m.group(1)), (m.group(3) or "").replace(" ", ""), m.group(4)))
    return out


def installed_version(name: str) -> str | None:
    from importlib import metadata
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None
    except Exception:  # pragma: no cover - a broken distribution
        return None


def applies(req: Req) -> bool:
    """False when the requirement's environment marker excludes this Python / platform."""
    if not req.marker or Marker is None:
        return True
    try:
        return Marker(req.marker).evaluate()
    except Exception:
        return True


def is_satisfied(req: Req, version_of: Callable[[str], str | None] = installed_version) -> bool:
    version = version_of(req.name)
    if version is None:
        return False
    if not req.specifier or SpecifierSet is None:
        return True
    try:
        return SpecifierSet(req.specifier).contains(version, prereleases=True)
    except Exception:      # a version string packaging cannot read: do not touch what is there
        return True


@dataclass
class Plan:
    install: list[Req]
    protected: list[Req]
    satisfied: list[Req]
    not_applicable: list[Req]
    host_owned: list[Req]          # pinned by the webui: left as they are
    host_too_old: list[Req]        # ... and older than asked for here (a warning)


def make_plan(reqs: Sequence[Req], version_of: Callable[[str], str | None] = installed_version,
              host_pins: dict[str, str] | None = None) -> Plan:
    plan = Plan([], [], [], [], [], [])
    host_pins = host_pins or {}
    for r in reqs:
        if r.name in PROTECTED:
            plan.protected.append(r)
        elif not applies(r):
            plan.not_applicable.append(r)
        elif r.name in host_pins and version_of(r.name) is not None:
            plan.host_owned.append(r)
            if not is_satisfied(r, version_of):
                plan.host_too_old.append(r)
        elif is_satisfied(r, version_of):
            plan.satisfied.append(r)
        else:
            plan.install.append(r)
    return plan


def constraints_text(version_of: Callable[[str], str | None] = installed_version,
                     host_pins: dict[str, str] | None = None) -> str:
    """``torch==2.5.1+cu124`` etc. for what is installed of torch and of the host's pins: pip may then not
    replace them while it installs the rest."""
    lines = []
    for name in list(PROTECTED) + sorted(set(host_pins or {}) - set(PROTECTED)):
        v = version_of(name)
        if v:
            lines.append(f"{name}=={v}")
    return "".join(line + "\n" for line in lines)


def read_pins(path: str) -> dict[str, str]:
    """``{canonical name: version}`` of the ``name==version`` lines of a webui requirements file."""
    pins: dict[str, str] = {}
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError:
        return pins
    for raw in text.splitlines():
        m = re.match(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*==\s*([^\s;#]+)", raw)
        if m:
            pins[canonical(m.group(1))] = m.group(2)
    return pins


# Where the webuis pin their packages: A1111 and Forge main in requirements_versions.txt (their requirements.txt is
# unpinned), Forge Classic and Neo in requirements.txt. REQS_FILE (the webuis' own override) is read first.
PIN_FILES = ("requirements_versions.txt", "requirements.txt")


def webui_pins() -> dict[str, str]:
    """The webui's pinned versions (its launch.py sits beside the requirements files)."""
    launch = sys.modules.get("launch")
    root = os.path.dirname(os.path.abspath(getattr(launch, "__file__", "") or ""))
    if not root:
        return {}
    names = [os.environ["REQS_FILE"]] if os.environ.get("REQS_FILE") else []
    pins: dict[str, str] = {}
    for name in names + [n for n in PIN_FILES if n not in names]:
        for k, v in read_pins(name if os.path.isabs(name) else os.path.join(root, name)).items():
            pins.setdefault(k, v)
    return pins


def webui_run_pip() -> Callable[..., object] | None:
    """``launch.run_pip`` when running under Automatic1111 / Forge (their installer puts launch.py in reach)."""
    try:
        import launch  # noqa: F401  (the webui's launch.py)
    except Exception:
        return None
    run_pip = getattr(launch, "run_pip", None)
    if callable(run_pip) and hasattr(launch, "is_installed"):
        return run_pip
    return None


def _quote(arg: str) -> str:
    return '"' + arg.replace('"', '\\"') + '"'       # the webui runs pip through the shell (cmd.exe or sh)


def pip_install(lines: Sequence[str], constraints: str | None,
                run_pip: Callable[..., object] | None = None,
                run: Callable[[list[str]], int] | None = None) -> bool:
    """Install ``lines`` in one pip call; True on success."""
    args = ["install", *lines]
    if constraints:
        args += ["-c", constraints]
    if run_pip is not None:
        try:
            run_pip(" ".join(a if a in ("install", "-c") else _quote(a) for a in args),
                    f"ict-reward requirements: {', '.join(lines)}")
            return True
        except Exception as e:       # run_pip raises RuntimeError with pip's output
            log.error("ICT reward: pip failed: %s", e)
            return False
    run = run or (lambda cmd: subprocess.run(cmd, check=False).returncode)
    return run([sys.executable, "-m", "pip", *args]) == 0


def main(argv: Sequence[str] | None = None, *, root: str = HERE,
         version_of: Callable[[str], str | None] = installed_version,
         run_pip: Callable[..., object] | None | bool = True,
         run: Callable[[list[str]], int] | None = None,
         host_pins: dict[str, str] | None = None) -> int:
    """``run_pip=True``: use the webui's ``launch.run_pip`` when under the webui (and its pins), else plain pip."""
    path = os.path.join(root, "requirements.txt")
    try:
        with open(path, encoding="utf-8") as f:
            reqs = parse_requirements(f.read())
    except OSError as e:
        log.error("ICT reward: cannot read %s (%s)", path, e)
        return 1
    if run_pip is True:
        run_pip = webui_run_pip()
        if run_pip is not None and host_pins is None:
            host_pins = webui_pins()
    run_pip = run_pip or None
    plan = make_plan(reqs, version_of, host_pins)
    if version_of("torch") is None:
        log.warning("ICT reward: torch is not installed in %s; install the build for your GPU first "
                    "(this script never installs torch)", sys.executable)
    for r in plan.host_too_old:
        log.warning("ICT reward: the webui pins %s==%s; this extension asks for %s. Left as it is (the webui "
                    "would put its version back at the next start).", r.name, (host_pins or {}).get(r.name),
                    r.line)
    if not plan.install:
        log.info("ICT reward: all requirements are installed.")
        log.info(WEIGHTS_HINT)
        return 0
    lines = [r.line for r in plan.install]
    log.info("ICT reward: installing %s", ", ".join(lines))
    constraints = constraints_text(version_of, host_pins)
    tmp = None
    if constraints:
        fd, tmp = tempfile.mkstemp(prefix="ict-reward-constraints-", suffix=".txt")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(constraints)
    try:
        ok = pip_install(lines, tmp, run_pip, run)
        failed: list[str] = []
        if not ok and len(lines) > 1:      # one bad package (no wheel for this platform ...) must not block the rest
            failed = [line for line in lines if not pip_install([line], tmp, run_pip, run)]
        elif not ok:
            failed = lines
    finally:
        if tmp:
            try:
                os.unlink(tmp)
            except OSError:  # pragma: no cover
                pass
    if failed:
        log.error("ICT reward: could not install %s; install them by hand with `%s -m pip install %s`",
                  ", ".join(failed), sys.executable, " ".join(_quote(x) for x in failed))
        return 1
    log.info("ICT reward: requirements installed.")
    log.info(WEIGHTS_HINT)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    sys.exit(main(sys.argv[1:]))
