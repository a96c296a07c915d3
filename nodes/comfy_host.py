"""Everything that touches ComfyUI (comfy.*, folder_paths), imported lazily.

The nodes must import and run without ComfyUI (unit tests, other hosts), so every function here
falls back to a plain-torch behaviour when ComfyUI's modules are absent.
"""
from __future__ import annotations

import gc
import logging
import os
import weakref
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


def model_folders() -> list[Path]:
    """The folders the loader lists, in ComfyUI's order (extra_model_paths.yaml first); downloads go to the first."""
    fp = _folder_paths()
    if fp is not None:
        register_model_folder()
        return [Path(p) for p in fp.get_folder_paths(FOLDER)]
    from ict_core.paths import default_models_dir

    return [default_models_dir()]


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
    """Full path of a listed name (an official release's choice: its converted file); a clear error when it is
    not there."""
    from ict_core import official
    from ict_core.errors import ModelFileError

    release = official.release_for(name)
    if release is not None:
        found = official.installed(release.kind, model_folders())
        if found is None:
            raise ModelFileError(f"{what} '{name}' is not downloaded yet; the ICT Model Loader downloads it when the "
                                 f"workflow runs")
        return found

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
    """(load_device, offload_device) by ComfyUI's rules for auxiliary encoders (as its CLIP vision), or
    None outside ComfyUI.  `cpu` runs on the CPU; ComfyUI's --cpu, --novram and --lowvram do too (they run
    text encoders and CLIP vision on the CPU), --gpu-only keeps the model on the GPU."""
    mm = _model_management()
    if mm is None:
        return None
    import torch

    if choice == "cpu":
        return torch.device("cpu"), torch.device("cpu")
    return mm.text_encoder_device(), mm.text_encoder_offload_device()


def load_scorer(ict_path, hp_path, precision: str, plan):
    """A scorer built like comfy/clip_vision.py builds CLIP vision: comfy.ops cast-at-use layers, weights
    waiting on the offload device in ComfyUI's text-encoder dtype where that keeps them exact (else as in
    the file; precision auto still scores in fp32), and the same ModelPatcher class that owns them, so
    ComfyUI can load them in part (--lowvram on a small GPU), offload and free them."""
    import comfy.model_management as mm
    import comfy.ops

    from ict_core import Scorer

    load_device, offload_device = plan
    scorer = Scorer.load(ict_path, hp_path, device=offload_device, run_device=load_device, precision=precision,
                         cache=open_cache(), operations=comfy.ops.manual_cast,
                         storage_dtype=mm.text_encoder_dtype(load_device))
    patcher = _patcher_class()(scorer.modules, load_device=load_device, offload_device=offload_device)
    weakref.finalize(scorer.modules, _released, str(ict_path))
    try:
        from comfy.patcher_extension import CallbacksMP

        patcher.add_callback(CallbacksMP.ON_LOAD, _move_loose_tensors)
    except ImportError:  # pragma: no cover - older ComfyUI: every load is a full one there
        pass
    return scorer, patcher


def _patcher_class():
    """The ModelPatcher class ComfyUI's own CLIP vision uses: `CoreModelPatcher` (0.33+; main.py points it at
    the Dynamic VRAM patcher where that is on, which hands CPU loads to the plain one), else `ModelPatcher`."""
    import comfy.model_patcher as mp

    return getattr(mp, "CoreModelPatcher", None) or mp.ModelPatcher


def _released(name: str) -> None:
    """When ComfyUI lets the model go (/free, another file chosen): give the freed weights (and the
    tokenizer's tables) back to the OS.

    glibc keeps freed blocks below its (adaptive, up to 32 MB) mmap threshold in the process heaps, so a
    freed model of many 5-30 MB tensors would stay in the server's RSS; malloc_trim returns them.  The
    model's modules hold reference cycles, so this runs inside a garbage collection, before the cycle's
    tensors are freed: trim again once that collection is over."""
    global _trim_after_gc
    from ict_core import text

    log.info("ICT model released: %s", name)
    text.release()
    _trim()
    _trim_after_gc = True
    if _after_collection not in gc.callbacks:
        gc.callbacks.append(_after_collection)


_trim_after_gc = False


def _after_collection(phase: str, _info) -> None:
    global _trim_after_gc
    if phase == "stop" and _trim_after_gc:
        _trim_after_gc = False
        _trim()


def _trim() -> None:
    from ict_core.memory import trim_heap

    trim_heap()


def _move_loose_tensors(patcher, device_to, *_args, **_kw) -> None:
    """After a (partial) load: the few tensors outside ComfyUI's layers (class embedding, position ids,
    logit scale: a few KB) follow the model to its device; a partial load moves only layers."""
    if device_to is None:
        return
    import torch

    for mod in patcher.model.modules():
        if hasattr(mod, "comfy_cast_weights"):
            continue
        for name, p in list(mod.named_parameters(recurse=False)):
            if p.device != device_to:  # as comfy.utils.set_attr_param replaces a parameter
                setattr(mod, name, torch.nn.Parameter(p.data.to(device_to), requires_grad=False))
        for name, b in list(mod.named_buffers(recurse=False)):
            if b.device != device_to:
                setattr(mod, name, b.to(device_to))


def load_for_inference(model, n_images: int) -> None:
    """Load the model for scoring `n_images`, asking ComfyUI for the activation memory of one chunk, then
    size the chunks from the memory left (as VAE decode does); the out-of-memory split stays the last resort."""
    patcher, scorer = model.patcher, model.scorer
    if patcher is None:
        return
    import comfy.model_management as mm

    from ict_core.modeling import activation_bytes
    from ict_core.scorer import default_chunk

    per_image = activation_bytes(scorer.modules, scorer.dtype)
    cap = default_chunk(patcher.load_device)
    mm.load_models_gpu([patcher], memory_required=per_image * max(1, min(n_images, cap)))
    free = mm.get_free_memory(patcher.load_device)
    scorer.chunk_size = max(1, min(cap, int(free // per_image)))


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

    def stage(self, stage: str, done: int, total: int) -> None:
        """ict_core.official's progress(stage, bytes done, bytes total), shown in MiB on the node's bar."""
        if stage == "download":
            self.progress(done >> 20, max(total >> 20, 1))

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
