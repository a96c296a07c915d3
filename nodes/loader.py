"""ICTModelLoader: picks the weight files and hands the scoring nodes a loaded, host-managed scorer."""
from __future__ import annotations

import logging
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path

from . import comfy_host, v3
from .v3 import io

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

    def prepare(self, n_images: int) -> None:
        """Put the weights on the run device (ComfyUI may have offloaded them for the diffusion model)."""
        comfy_host.load_for_inference(self, n_images)

    def describe(self) -> str:
        hp = f" + HP {self.hp_name}" if self.hp_name else ""
        return f"ICT {self.ict_name}{hp} ({self.scorer.dtype}, {self.scorer.device})"


# Live models by file key, held weakly: ComfyUI's node output cache owns a loaded model (as it owns a
# checkpoint), so "Unload models" / "Free model and node cache" free it; this map only lets a second loader
# with the same files share the model while it is alive.
_live: weakref.WeakValueDictionary[tuple, ICTModel] = weakref.WeakValueDictionary()
_lock = threading.Lock()


def _file_key(path: Path | None) -> tuple:
    if path is None:
        return (None,)
    st = path.stat()
    return (str(path.resolve()), st.st_mtime_ns, st.st_size)


def _awaiting_download(*names: str) -> bool:
    """Whether a name is an official release's choice whose file is not in the model folders yet."""
    from ict_core import official

    return any((r := official.release_for(n)) is not None and official.installed(r.kind, comfy_host.model_folders())
               is None for n in names)


def _file_name(choice: str, path: Path) -> str:
    """The name records and logs give a model: the listed name, and for an official release's choice the file it
    resolved to, so two loaders sharing one file (by either name) record it alike."""
    from ict_core import official

    return path.name if official.release_for(choice) is not None else choice


def download_missing(ict_name: str, hp_name: str) -> None:
    """Download and convert the official releases the choices name and the folders lack, with ComfyUI's progress
    bar on the node; Cancel stops the transfer (the next run resumes it)."""
    from ict_core import official

    for name in (ict_name, hp_name):
        release = official.release_for(name)
        if release is None or official.installed(release.kind, comfy_host.model_folders()) is not None:
            continue
        folder = comfy_host.model_folders()[0]
        log.info("downloading %s into %s (first use)", release.repo, folder)
        bar = comfy_host.Progress(1)
        official.ensure(release.kind, folder, progress=bar.stage, check_cancel=bar.should_stop)


def check_choice(ict_name: str, hp_name: str, precision: str,
                 device: str) -> tuple[Path, Path | None] | None:
    """The files' paths after the checks that need no tensor read (kind, architecture, names, shapes); None when a
    chosen official release is still to be downloaded (the run downloads it, then checks).

    Run when ComfyUI validates a queued workflow, so a wrong choice is refused before ComfyUI drops the
    model loaded for the previous choice."""
    from ict_core import weights
    from ict_core.errors import InputError

    if precision not in PRECISIONS:
        raise InputError(f"precision '{precision}' is not one of {', '.join(PRECISIONS)}")
    if device not in DEVICES:
        raise InputError(f"device '{device}' is not one of {', '.join(DEVICES)}")
    if _awaiting_download(ict_name, hp_name):
        return None
    ict_path = comfy_host.resolve_model_file(ict_name, "ict_model")
    hp_path = None if hp_name in (None, "", NONE) else comfy_host.resolve_model_file(hp_name, "hp_model")
    ict_info = weights.open_model_file(ict_path, "ict")
    if hp_path is not None:
        hp_info = weights.open_model_file(hp_path, "hp")
        if hp_info.arch["projection_dim"] != ict_info.arch["projection_dim"]:
            from ict_core.errors import ModelFileError

            raise ModelFileError(f"hp_model '{hp_name}' and ict_model '{ict_name}' are for different architectures; "
                                 f"use matching files")
    return ict_path, hp_path


def load_model(ict_name: str, hp_name: str, precision: str, device: str) -> ICTModel:
    """Load a scorer (or share the live one for the same files); nothing is kept here after the caller drops it."""
    from ict_core import Scorer

    paths = check_choice(ict_name, hp_name, precision, device)
    if paths is None:
        download_missing(ict_name, hp_name)
        paths = check_choice(ict_name, hp_name, precision, device)
    ict_path, hp_path = paths
    key = (_file_key(ict_path), _file_key(hp_path), precision, device)
    with _lock:
        hit = _live.get(key)
        if hit is not None:
            log.info("ICT model shared with another loader: %s", hit.describe())
            return hit
        plan = comfy_host.plan_device(device)
        if plan is None:  # no ComfyUI: ict_core places the model itself
            scorer = Scorer.load(ict_path, hp_path, device=device, precision=precision,
                                 cache=comfy_host.open_cache())
            patcher = None
        else:
            scorer, patcher = comfy_host.load_scorer(ict_path, hp_path, precision, plan)
        model = ICTModel(scorer, patcher, _file_name(ict_name, ict_path),
                         None if hp_path is None else _file_name(hp_name, hp_path), precision)
        _live[key] = model
        log.info("ICT model loaded: %s", model.describe())
        return model


_TIPS = {
    "ict_model": ("8y/ICT (download): the official model, downloaded from Hugging Face (2 GB) and converted into "
                  "models/ict on the first run; or a converted .safetensors file in models/ict"),
    "hp_model": ("optional HP model, needed for score_by hp, ict*hp and group; 8y/HP (download) fetches the official "
                 "one on the first run"),
    "precision": ("auto = fp32, the official scores; fp16/bf16 are faster on a GPU (bf16 also on a CPU with native "
                  "bf16) and differ slightly"),
    "device": "auto: ComfyUI's device (respects --cpu, --lowvram, --highvram)",
}


def _paths(ict_model: str, hp_model: str) -> list[Path]:
    paths = [comfy_host.resolve_model_file(ict_model, "ict_model")]
    if hp_model not in (None, "", NONE):
        paths.append(comfy_host.resolve_model_file(hp_model, "hp_model"))
    return paths


class ICTModelLoader(io.ComfyNode):
    """Loads the ICT model (and optionally the HP model) from ComfyUI's models/ict folder."""

    @classmethod
    def define_schema(cls):
        from ict_core.official import RELEASES

        files = comfy_host.list_model_files()
        return v3.schema(
            node_id="ICTModelLoader", display_name="ICT Model Loader",
            description=("Loads the ICT/HP reward models: the official ones (downloaded and converted on the first "
                         "run) or converted .safetensors in models/ict. The model stays in memory between runs; "
                         "ComfyUI offloads it when the diffusion model needs the memory."),
            search_aliases=["reward model", "image reward", "aesthetic score", "hp model", "clip score"],
            inputs=[
                io.Combo.Input("ict_model", options=[RELEASES["ict"].choice, *files], tooltip=_TIPS["ict_model"]),
                io.Combo.Input("hp_model", options=[NONE, RELEASES["hp"].choice, *files], default=NONE,
                               tooltip=_TIPS["hp_model"]),
                io.Combo.Input("precision", options=list(PRECISIONS), default="auto", tooltip=_TIPS["precision"]),
                io.Combo.Input("device", options=list(DEVICES), default="auto", tooltip=_TIPS["device"]),
            ],
            outputs=[v3.ICT_MODEL.Output(display_name="model", tooltip="the scorer for the ICT nodes")],
        )

    @classmethod
    def fingerprint_inputs(cls, ict_model, hp_model, precision, device):
        """Run again when a file is replaced on disk under the same name."""
        try:
            return repr([_file_key(p) for p in _paths(ict_model, hp_model)] + [precision, device])
        except Exception:  # the run itself reports the problem clearly
            return float("nan")

    @classmethod
    def validate_inputs(cls, ict_model, hp_model, precision, device):
        """Refuse a wrong file when the workflow is queued: the model loaded before stays loaded."""
        from ict_core.errors import ICTError

        try:
            check_choice(ict_model, hp_model, precision, device)
        except ICTError as e:
            return str(e)
        return True

    @classmethod
    def execute(cls, ict_model, hp_model, precision, device) -> io.NodeOutput:
        return io.NodeOutput(load_model(ict_model, hp_model, precision, device))
