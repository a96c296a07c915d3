"""Everything that touches ComfyUI (comfy.*, folder_paths), imported lazily.

The nodes must import and run without ComfyUI (unit tests, other hosts), so every function here
falls back to a plain-torch behaviour when ComfyUI's modules are absent.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

FOLDER = "ict"
EXTENSIONS = {".safetensors"}


def _folder_paths():
    try:
        import folder_paths  # ComfyUI's module; absent outside ComfyUI
    except ImportError:
        return None
    if not hasattr(folder_paths, "folder_names_and_paths"):  # another package of that name
        return None
    return folder_paths


def _model_management():
    try:
        import comfy.model_management as mm
    except ImportError:
        return None
    return mm


def in_comfyui() -> bool:
    return _folder_paths() is not None and _model_management() is not None


# --------------------------------------------------------------------------------------- model folder
def register_model_folder() -> None:
    """Register models/ict and make it list .safetensors only.

    extra_model_paths.yaml is read before custom nodes load, so an `ict:` entry there may already
    have created the folder with an empty extension set (= every file); keep its paths, fix the set.
    """
    fp = _folder_paths()
    if fp is None:
        return
    default = os.path.join(fp.models_dir, FOLDER)
    paths, _ = fp.folder_names_and_paths.get(FOLDER, ([], set()))
    if default not in paths:
        paths = paths + [default]
    fp.folder_names_and_paths[FOLDER] = (paths, set(EXTENSIONS))
    try:  # so users see where the files go; a read-only install is fine too
        os.makedirs(default, exist_ok=True)
    except OSError:
        pass


def list_model_files() -> list[str]:
    """Names the loader offers: files of the `ict` folder(s), or of ict_core's default folder."""
    fp = _folder_paths()
    if fp is not None:
        register_model_folder()
        return fp.get_filename_list(FOLDER)
    from ict_core.paths import default_models_dir

    root = default_models_dir()
    if not root.is_dir():
        return []
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.suffix.lower() in EXTENSIONS)


def resolve_model_file(name: str, what: str) -> Path:
    """Full path of a listed name; a clear error when it is not there."""
    from ict_core.errors import ModelFileError

    fp = _folder_paths()
    if fp is not None:
        register_model_folder()
        full = fp.get_full_path(FOLDER, name)
        if full is None:
            where = ", ".join(fp.get_folder_paths(FOLDER))
            raise ModelFileError(f"{what} '{name}' is not in the ict model folder ({where}); put the converted "
                                 f".safetensors file there and press R in ComfyUI to refresh the list")
        return Path(full)
    p = Path(name)
    if p.is_file():
        return p
    from ict_core.paths import default_models_dir

    full = default_models_dir() / name
    if not full.is_file():
        raise ModelFileError(f"{what} '{name}' not found (looked in {default_models_dir()})")
    return full


def cache_dir() -> Path | None:
    """Embedding cache folder inside ComfyUI: $ICT_CACHE_DIR, else ComfyUI's user folder
    (user/ict-reward); None lets ict_core pick its own default outside ComfyUI."""
    if os.environ.get("ICT_CACHE_DIR"):
        return None
    fp = _folder_paths()
    if fp is not None and hasattr(fp, "get_user_directory"):
        return Path(fp.get_user_directory()) / "ict-reward"
    return None


def open_cache():
    """The prompt/image embedding cache, or None: it is an accelerator, never a reason to fail."""
    try:
        from ict_core.cache import EmbeddingCache

        return EmbeddingCache(cache_dir())
    except Exception as e:  # e.g. faiss missing and numpy fallback failing: score without a cache
        log.warning("ICT embedding cache unavailable (%s); prompts will be encoded each run", e)
        return None


# ------------------------------------------------------------------------------------ device and dtype
def plan_device(choice: str):
    """(load_device, offload_device) as ComfyUI would place a CLIP-sized model, or None outside ComfyUI.

    `cpu` and ComfyUI's --cpu run on the CPU.  --novram also runs on the CPU: ComfyUI would load the
    model only in parts there, which needs comfy.ops layers (these are plain torch layers).
    --highvram keeps the model on the GPU between runs (unet_offload_device is the GPU then).
    """
    mm = _model_management()
    if mm is None:
        return None
    import torch

    cpu = torch.device("cpu")
    if choice == "cpu" or mm.cpu_mode() or mm.vram_state in (mm.VRAMState.DISABLED, mm.VRAMState.NO_VRAM):
        return cpu, cpu
    return mm.get_torch_device(), mm.unet_offload_device()


def make_patcher(module, load_device, offload_device):
    """Wrap the scorer's weights so ComfyUI's model management can load/offload them."""
    import comfy.model_patcher

    return comfy.model_patcher.ModelPatcher(module, load_device=load_device, offload_device=offload_device)


def load_for_inference(patcher, memory_required: int = 0) -> None:
    """Move the whole model to its load device, offloading other models when memory is short.

    force_full_load: the layers are plain torch modules, which cannot run half on the CPU.
    """
    if patcher is None:
        return
    import comfy.model_management as mm

    mm.load_models_gpu([patcher], memory_required=memory_required, force_full_load=True)


# ----------------------------------------------------------------------------------- progress, cancel
class Progress:
    """Bridge from ict_core's progress/should_stop callbacks to ComfyUI's bar and Cancel button."""

    def __init__(self, total: int):
        self.bar = None
        self.mm = _model_management()
        try:
            import comfy.utils

            self.bar = comfy.utils.ProgressBar(total)
        except ImportError:
            pass

    def progress(self, done: int, total: int) -> None:
        if self.bar is not None:
            self.bar.update_absolute(done, total)

    def should_stop(self) -> bool:
        if self.mm is not None:
            self.mm.throw_exception_if_processing_interrupted()  # raises ComfyUI's own interrupt exception
        return False


def blocked_output(message: str):
    """An output that stops downstream nodes with `message` (or None outside ComfyUI)."""
    try:
        from comfy_execution.graph_utils import ExecutionBlocker
    except ImportError:
        return None
    return ExecutionBlocker(message)
