"""install.py, shared by ComfyUI-Manager and the webui's extension installer: never touches torch, installs only
what is missing, uses launch.run_pip under the webui and `python -m pip` elsewhere. No network: pip is faked."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def load_install():
    spec = importlib.util.spec_from_file_location("ict_install_under_test", ROOT / "install.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod          # dataclasses look their module up while the file runs
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture()
def inst():
    return load_install()


VERSIONS = {"torch": "2.5.1+cu124", "torchvision": "0.20.1+cu124", "transformers": "4.46.0", "pillow": "11.0.0",
            "numpy": "2.1.0"}


def version_of(name):
    return VERSIONS.get(name)


REQS = """\
# comment line
torch>=2.1
torchvision
TorchAudio==2.0  # even pinned
transformers>=4.40,<6
open_clip-torch>=2.24   # not installed
Pillow>=10
numpy>=3              # installed but too old
faiss-cpu>=1.7.4 ; python_version < "3"
-r other.txt
--index-url https://example.invalid/simple
"""


def test_parse_and_plan_skip_torch_and_satisfied(inst):
    reqs = inst.parse_requirements(REQS)
    assert [r.name for r in reqs] == ["torch", "torchvision", "torchaudio", "transformers", "open-clip-torch",
                                      "pillow", "numpy", "faiss-cpu"]
    plan = inst.make_plan(reqs, version_of)
    assert [r.name for r in plan.protected] == ["torch", "torchvision", "torchaudio"]
    assert [r.line for r in plan.install] == ["open_clip-torch>=2.24", "numpy>=3"]
    assert [r.name for r in plan.satisfied] == ["transformers", "pillow"]
    assert [r.name for r in plan.not_applicable] == ["faiss-cpu"]


def test_without_packaging_versions_are_not_compared(inst, monkeypatch):
    monkeypatch.setattr(inst, "Requirement", None)
    monkeypatch.setattr(inst, "SpecifierSet", None)
    monkeypatch.setattr(inst, "Marker", None)
    reqs = inst.parse_requirements(REQS)
    assert [r.name for r in reqs][:5] == ["torch", "torchvision", "torchaudio", "transformers", "open-clip-torch"]
    plan = inst.make_plan(reqs, version_of)
    assert "torch" not in [r.name for r in plan.install]
    assert [r.name for r in plan.install] == ["open-clip-torch", "faiss-cpu"]       # numpy is there: left alone


def test_the_repository_requirements_never_install_torch(inst):
    reqs = inst.parse_requirements((ROOT / "requirements.txt").read_text())
    assert reqs, "requirements.txt lists nothing"
    plan = inst.make_plan(reqs, lambda name: None)          # nothing installed at all
    assert not {r.name for r in plan.install} & {"torch", "torchvision", "torchaudio"}
    assert not plan.protected, "torch is the host's: requirements.txt does not list it"


def test_requirements_txt_is_the_registry_dependency_list_without_torch(inst):
    """The legacy Manager and the webuis read requirements.txt, the Comfy Registry reads [project].dependencies:
    one list, and neither names torch (the host ships the build for its GPU)."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    from_txt = sorted(r.line for r in inst.parse_requirements((ROOT / "requirements.txt").read_text()))
    assert from_txt == sorted(project["dependencies"])
    names = {inst.canonical(r.name) for r in inst.parse_requirements("\n".join(project["dependencies"]))}
    assert not names & set(inst.PROTECTED)


def test_torch_missing_is_said_even_though_no_requirement_names_it(inst, tmp_path, caplog):
    calls = []
    rc = inst.main([], root=write_reqs(tmp_path, "tqdm>=4\n"), version_of=lambda name: None, run_pip=False,
                   run=lambda cmd: calls.append(cmd) or 0)
    assert rc == 0 and calls
    assert "torch is not installed" in caplog.text


def test_registry_metadata_in_pyproject():
    """What the Comfy Registry reads: [tool.comfy], the OS/GPU classifiers it accepts, a license file, an icon."""
    tomllib = pytest.importorskip("tomllib")
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    comfy, project = data["tool"]["comfy"], data["project"]
    assert comfy["PublisherId"] and comfy["DisplayName"]
    assert comfy["Icon"].endswith("/web/icon.png") and (ROOT / "web" / "icon.png").is_file()
    assert comfy["requires-comfyui"].startswith(">=")
    accelerators = {"GPU :: NVIDIA CUDA", "GPU :: AMD ROCm", "GPU :: Intel Arc", "NPU :: Huawei Ascend",
                    "GPU :: Apple Metal"}
    envs = [c.split(" :: ", 1)[1] for c in project["classifiers"] if c.startswith("Environment ::")]
    oses = [c for c in project["classifiers"] if c.startswith("Operating System ::")]
    assert envs and set(envs) <= accelerators and oses
    assert all(f.is_file() for f in map(ROOT.joinpath, project["license-files"]))
    assert "MIT" in (ROOT / "LICENSE").read_text().splitlines()[0]


def test_comfyignore_keeps_tests_bench_and_docs_out_of_the_node_archive():
    patterns = {line.strip() for line in (ROOT / ".comfyignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")}
    assert {"tests/", "bench/", "docs/"} <= patterns
    for needed in ("__init__.py", "nodes", "ict_core", "web", "example_workflows", "install.py", "requirements.txt",
                   "pyproject.toml", "LICENSE"):
        assert not any(p.rstrip("/") == needed for p in patterns), needed


def test_real_environment_is_read(inst):
    assert inst.installed_version("pytest")
    assert inst.installed_version("surely-not-installed-ict-xyz") is None
    r = inst.parse_requirements("pytest>=1\nsurely-not-installed-ict-xyz\npytest>=999")
    assert [inst.is_satisfied(x) for x in r] == [True, False, False]


def write_reqs(tmp_path, text=REQS):
    (tmp_path / "requirements.txt").write_text(text)
    return tmp_path


def test_plain_python_uses_this_interpreter_with_torch_pinned(inst, tmp_path):
    calls = []

    def run(cmd):
        constraints = Path(cmd[cmd.index("-c") + 1]).read_text()
        calls.append((cmd, constraints))
        return 0

    rc = inst.main([], root=str(write_reqs(tmp_path)), version_of=version_of, run_pip=None, run=run)
    assert rc == 0 and len(calls) == 1
    cmd, constraints = calls[0]
    assert cmd[:4] == [sys.executable, "-m", "pip", "install"]
    assert cmd[4:6] == ["open_clip-torch>=2.24", "numpy>=3"]
    assert not any(a.lower().startswith("torch") for a in cmd[4:])
    assert constraints == "torch==2.5.1+cu124\ntorchvision==0.20.1+cu124\n"
    assert not Path(cmd[cmd.index("-c") + 1]).exists()           # the temporary constraints file is removed


def test_webui_uses_launch_run_pip(inst, tmp_path, monkeypatch):
    seen = []
    launch = types.ModuleType("launch")
    launch.run_pip = lambda command, desc=None, live=False: seen.append((command, desc))
    launch.is_installed = lambda name: False
    monkeypatch.setitem(sys.modules, "launch", launch)
    rc = inst.main([], root=str(write_reqs(tmp_path)), version_of=version_of,
                   run=lambda cmd: pytest.fail("pip must go through launch.run_pip"))
    assert rc == 0 and len(seen) == 1
    command, desc = seen[0]
    assert command.startswith('install "open_clip-torch>=2.24" "numpy>=3" -c "')
    assert "ict-reward" in desc


def test_nothing_missing_runs_no_pip(inst, tmp_path, caplog):
    caplog.set_level("INFO")
    rc = inst.main([], root=str(write_reqs(tmp_path, "torch\ntransformers>=4\n")), version_of=version_of,
                   run_pip=None, run=lambda cmd: pytest.fail("nothing to install"))
    assert rc == 0
    assert "ict_core fetch" in caplog.text


def test_a_failing_package_does_not_block_the_others(inst, tmp_path, caplog):
    calls = []

    def run(cmd):
        pkgs = cmd[4:cmd.index("-c")]
        calls.append(pkgs)
        return 1 if any(p.startswith("numpy") for p in pkgs) else 0

    rc = inst.main([], root=str(write_reqs(tmp_path)), version_of=version_of, run_pip=None, run=run)
    assert rc == 1
    assert calls == [["open_clip-torch>=2.24", "numpy>=3"], ["open_clip-torch>=2.24"], ["numpy>=3"]]
    assert "could not install numpy>=3" in caplog.text


def test_webui_run_pip_failure_is_reported(inst, tmp_path, monkeypatch, caplog):
    def run_pip(command, desc=None, live=False):
        raise RuntimeError("Couldn't install")
    rc = inst.main([], root=str(write_reqs(tmp_path, "some-missing-pkg>=1\n")), version_of=version_of,
                   run_pip=run_pip)
    assert rc == 1 and "some-missing-pkg" in caplog.text


def test_missing_requirements_file(inst, tmp_path):
    assert inst.main([], root=str(tmp_path), version_of=version_of, run_pip=None, run=lambda c: 0) == 1


def test_runs_as_a_script_without_touching_anything(tmp_path):
    """What both hosts do: `python install.py`; here everything it needs is already in the venv."""
    (tmp_path / "requirements.txt").write_text("torch\npytest>=1\n")
    (tmp_path / "install.py").write_text((ROOT / "install.py").read_text())
    out = subprocess.run([sys.executable, str(tmp_path / "install.py")], capture_output=True, text=True,
                         cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "all requirements are installed" in out.stdout


def _fake_launch(webui, monkeypatch) -> list:
    """A stand-in for the webui's `launch` module in `webui`; returns the list of (pip command, constraints) run."""
    launch = types.ModuleType("launch")
    launch.__file__ = str(webui / "launch.py")
    seen = []
    launch.run_pip = lambda command, desc=None, live=False: seen.append(
        (command, Path(command.split(' -c "')[1].rstrip('"')).read_text()))
    launch.is_installed = lambda name: True
    monkeypatch.setitem(sys.modules, "launch", launch)
    return seen


def test_webui_pins_are_left_alone_and_pinned(inst, tmp_path, monkeypatch, caplog):
    """A1111 re-installs its requirements_versions.txt pins at every start: changing them would flip-flop."""
    webui = tmp_path / "webui"
    webui.mkdir()
    (webui / "requirements_versions.txt").write_text("Pillow==9.5.0\ntransformers==4.30.2\nnumpy==1.26.2\n"
                                                     "open-clip-torch==2.20.0\n")
    seen = _fake_launch(webui, monkeypatch)
    versions = dict(VERSIONS, pillow="9.5.0", transformers="4.30.2", numpy="1.26.2", **{"open-clip-torch": "2.20.0"})
    reqs = write_reqs(tmp_path, "torch\ntransformers>=4.40\nPillow>=10\nnumpy>=1.24\nopen-clip-torch>=2.24\n"
                                "faiss-cpu>=1.7.4\n")
    caplog.set_level("INFO")
    rc = inst.main([], root=str(reqs), version_of=versions.get)
    assert rc == 0 and len(seen) == 1
    command, constraints = seen[0]
    assert command.startswith('install "faiss-cpu>=1.7.4" -c ')
    assert constraints.splitlines() == ["torch==2.5.1+cu124", "torchvision==0.20.1+cu124", "numpy==1.26.2",
                                        "open-clip-torch==2.20.0", "pillow==9.5.0", "transformers==4.30.2"]
    assert "the webui pins transformers==4.30.2" in caplog.text and "the webui pins pillow==9.5.0" in caplog.text
    assert "numpy==1.26.2; this extension" not in caplog.text


def test_read_pins(inst, tmp_path):
    f = tmp_path / "r.txt"
    f.write_text("# c\nGitPython==3.1.32\nPillow == 9.5.0  # x\naccelerate\ntorch\n"
                 "foo[bar]==1.0 ; python_version>'3'\n")
    assert inst.read_pins(str(f)) == {"gitpython": "3.1.32", "pillow": "9.5.0", "foo": "1.0"}
    assert inst.read_pins(str(tmp_path / "missing.txt")) == {}


@pytest.mark.parametrize("layout", ["a1111", "forge-classic", "reqs-file"])
def test_webui_pins_are_found_in_every_webui_layout(inst, tmp_path, monkeypatch, layout):
    """A1111 / Forge main pin in requirements_versions.txt (requirements.txt unpinned); Forge Classic and Neo pin in
    requirements.txt; REQS_FILE overrides both. Each layout must protect transformers==4.30.2 the same way."""
    webui = tmp_path / "webui"
    webui.mkdir()
    monkeypatch.delenv("REQS_FILE", raising=False)
    if layout == "a1111":
        (webui / "requirements_versions.txt").write_text("transformers==4.30.2\nPillow==9.5.0\n")
        (webui / "requirements.txt").write_text("transformers\nPillow\n")
    elif layout == "forge-classic":
        (webui / "requirements.txt").write_text("GitPython==3.1.32\ntransformers==4.30.2\nPillow==9.5.0\ntorch\n")
    else:
        (webui / "requirements.txt").write_text("transformers==9.9\n")
        (webui / "mine.txt").write_text("transformers==4.30.2\nPillow==9.5.0\n")
        monkeypatch.setenv("REQS_FILE", "mine.txt")
    seen = _fake_launch(webui, monkeypatch)
    assert inst.webui_pins()["transformers"] == "4.30.2" and inst.webui_pins()["pillow"] == "9.5.0"
    versions = dict(VERSIONS, transformers="4.30.2", pillow="9.5.0")
    reqs = write_reqs(tmp_path, "transformers>=4.40\nPillow>=10\nfaiss-cpu>=1.7.4\n")
    assert inst.main([], root=str(reqs), version_of=versions.get) == 0
    command, constraints = seen[0]
    assert command.startswith('install "faiss-cpu>=1.7.4" -c ') and "transformers" not in command
    assert "transformers==4.30.2" in constraints.splitlines() and "pillow==9.5.0" in constraints.splitlines()
