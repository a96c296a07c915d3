"""Converting the released pickles to safetensors once, and loading safetensors (never a pickle) at run time."""
from __future__ import annotations

import json
import logging
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import config as arch_config
from .errors import InputError, ModelFileError
from .files import atomic_write, check_new_file, open_regular, regular_file_problem
from .model_checks import BOTH, check_arch_fits, check_shapes

if TYPE_CHECKING:
    import torch  # annotations only: reading a header or a fingerprint imports no torch

log = logging.getLogger(__name__)

FORMAT_VERSION = "1"
META_KIND, META_ARCH, META_SHA, META_SRC, META_VER = (
    "ict_reward.kind", "ict_reward.architecture", "ict_reward.source_sha256", "ict_reward.source",
    "ict_reward.format")
KINDS = ("ict", "hp")
DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}  # names in torch
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")  # pickles' file names: refused, named, never loaded
_ST_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}  # what a model file may hold


# ----------------------------------------------------------------------------------------------- reading headers
@dataclass(frozen=True)
class FileInfo:
    """What a converted file says about itself, read from its header alone."""
    path: Path
    kind: str
    arch: dict[str, Any]
    metadata: dict[str, str]
    tensors: dict[str, tuple[str, tuple[int, ...]]]   # name -> (dtype, shape)
    header_bytes: bytes
    size: int


def looks_like_pickle(path: Path, head: bytes) -> bool:
    """torch.save's zip archive or a legacy pickle (protocol 2..5 opcode), or a pickle file name.
    Asked only of files that are not valid safetensors (whose first bytes are a header length)."""
    return (head[:4] == b"PK\x03\x04" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"))
            or path.suffix.lower() in PICKLE_SUFFIXES)


def _not_safetensors(path: Path, reason: str) -> ModelFileError:
    from .model_hints import convert_command

    try:
        with open_regular(path) as f:
            head = f.read(9)
    except OSError:
        head = b""
    if head[8:9] != b"{" and looks_like_pickle(path, head):
        return ModelFileError(
            f"{path} is a PyTorch pickle, which is never loaded at run time (it can run code); "
            f"convert it once with `{convert_command(path)}`")
    return ModelFileError(f"{path} is truncated or not a safetensors file ({reason}); download or convert it again")


def _header_bytes(path: Path) -> bytes:
    """The raw JSON header, for the fingerprint (the library has checked it; this only reads it back)."""
    with open_regular(path) as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return f.read(n)


def read_info(path: str | Path) -> FileInfo:
    """Check a safetensors file with the safetensors library and read its header (no tensor data is read)."""
    from safetensors import safe_open

    path = Path(path)
    problem = regular_file_problem(path)
    if problem == "not found":
        raise ModelFileError(f"model file {path} not found; run `ict fetch` or give the path of a converted "
                             f".safetensors file")
    if problem == "a folder, not a file":
        raise ModelFileError(f"{path} is a folder; give the converted .safetensors file (`ict convert {path} "
                             f"--out model.safetensors` makes one from a downloaded 8y/ICT or 8y/HP folder)")
    if problem is not None:
        raise ModelFileError(f"{path} is {problem}; give a converted .safetensors file")
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            tensors = {}
            for name in f.keys():
                part = f.get_slice(name)
                tensors[name] = (part.get_dtype(), tuple(part.get_shape()))
        header_bytes = _header_bytes(path)
        size = path.stat().st_size
    except Exception as e:  # the library's SafetensorError (or an OSError): the header is not valid
        raise _not_safetensors(path, str(e).splitlines()[0][:120] if str(e) else type(e).__name__) from None
    kind = meta.get(META_KIND)
    if kind not in KINDS or META_ARCH not in meta:
        raise ModelFileError(f"{path} was not written by `ict convert` (no ict-reward metadata); "
                             f"convert the released weights with `ict convert`")
    try:
        arch = arch_config.architecture(json.loads(meta[META_ARCH]))
    except (ValueError, InputError) as e:
        raise ModelFileError(f"{path} has an unreadable architecture record ({e}); convert it again") from None
    odd = sorted(k for k, (dt, _) in tensors.items() if dt not in _ST_DTYPES)
    if odd:
        raise ModelFileError(f"{path} holds tensors that are not float ({', '.join(odd[:3])}: "
                             f"{tensors[odd[0]][0]}); convert the released weights again")
    return FileInfo(path, kind, arch, meta, tensors, header_bytes, size)


def read_kind(path: str | Path) -> str:
    return read_info(path).kind


def fingerprint(path: str | Path, info: FileInfo | None = None) -> str:
    """Identity of a weight file for caches: the sha256 of the whole file (24 hex digits), so two files
    differing in any byte never share cached features. Hashed once per file and remembered by
    (path, size, mtime, inode), as the webuis remember checkpoint hashes (model_hashes)."""
    from .model_hashes import file_hash

    info = info or read_info(path)
    return file_hash(info.path)[:24]


# ------------------------------------------------------------------------------------------------------ loading
def load_state(info: FileInfo, device: torch.device, dtype_for=None) -> dict[str, torch.Tensor]:
    """Tensors one by one from the file to `device`, each cast there to `dtype_for(name)`.

    The safetensors library reads each tensor (safe_open(...).get_tensor, as ComfyUI's load_torch_file
    does); one tensor in flight keeps peak memory near the size of the loaded model, so a bf16 file loaded
    as fp32 never holds both copies of the weights. Each tensor is checked against the header read_info
    checked (a file replaced since then is refused)."""
    import torch
    from safetensors import safe_open

    state: dict[str, torch.Tensor] = {}
    try:
        with safe_open(str(info.path), framework="pt", device="cpu") as f:
            if set(f.keys()) != set(info.tensors):
                raise ValueError("the tensor names changed since the header was read")
            for name in sorted(info.tensors):
                st_dtype, shape = info.tensors[name]
                x = f.get_tensor(name)
                if x.dtype != getattr(torch, _ST_DTYPES[st_dtype]) or tuple(x.shape) != tuple(shape):
                    raise ValueError(f"{name}: {x.dtype}{list(x.shape)} where the header said {st_dtype}{list(shape)}")
                want = dtype_for(name) if dtype_for is not None and x.is_floating_point() else None
                # a copy, never a view of the file's mapping: fresh, aligned memory (kernels round alike)
                state[name] = x.to(device, copy=True).to(want) if want is not None else x.to(device, copy=True)
    except Exception as e:  # noqa: BLE001 - the library's SafetensorError, OSError, a changed file
        raise ModelFileError(f"{info.path} could not be read ({type(e).__name__}: {str(e)[:120]}); it may be "
                             f"corrupt: download or convert it again") from None
    return state


def open_model_file(path: str | Path, kind: str, arch: dict[str, Any] | None = None) -> FileInfo:
    """Header checks done before any tensor is read: kind, expected architecture, tensor names and shapes."""
    from .modeling import expected_hp_shapes, expected_ict_shapes

    info = read_info(path)
    if info.kind != kind:
        want = "ICT model (--model / ict_model)" if kind == "ict" else "HP model (--hp-model / hp_model)"
        raise ModelFileError(f"{info.path} is an {info.kind.upper()} model but was given as the {want}; "
                             f"swap the two files")
    if arch is not None and arch_config.dumps(arch) != arch_config.dumps(info.arch):
        raise ModelFileError(f"{info.path} is for another architecture than the one asked for; use the matching "
                             f"--config or the right weights")
    got = {k: v[1] for k, v in info.tensors.items()}
    what, fix = f"{info.path} does not match its own architecture record", "convert it again"
    check_arch_fits(info.arch, got, BOTH if kind == "ict" else ("vision_config",), what, fix)
    check_shapes(got, expected_ict_shapes(info.arch) if kind == "ict" else expected_hp_shapes(info.arch), what, fix)
    return info


# --------------------------------------------------------------------------------------------------- converting
def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    """The one place a pickle is read: the converter, with weights_only=True (no code can run)."""
    import torch
    try:
        with warnings.catch_warnings():  # torch < 2.4 warns about its own TypedStorage while loading
            warnings.filterwarnings("ignore", message="TypedStorage is deprecated")
            sd = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)  # torch < 2.2: a str
    except Exception as e:
        raise ModelFileError(f"cannot read {path} as a PyTorch checkpoint ({type(e).__name__}: {str(e)[:160]}); "
                             f"download it again") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ModelFileError(f"{path} does not hold a state dict of tensors; is it the right file?")
    return sd


def _check_source(sd: dict[str, torch.Tensor], expected, src: Path, arch: dict[str, Any] | None = None) -> None:
    got = {k: tuple(v.shape) for k, v in sd.items()}
    what, fix = f"{src} does not match the architecture", "check the source folder or pass the right --config"
    if arch is not None:
        check_arch_fits(arch, got, BOTH, what, fix)
    check_shapes(got, expected(arch) if arch is not None else expected, what, fix)


def detect_layout(src: Path) -> tuple[str, dict[str, Path]]:
    """Which released layout a folder (or file) is: 8y/ICT or 8y/HP."""
    problem = regular_file_problem(src)
    if problem is None:
        return "ict", {"ict": src}
    if problem not in ("not found", "a folder, not a file"):
        raise InputError(f"{src} is {problem}; give the folder of a downloaded 8y/ICT or 8y/HP copy")
    hp_b, hp_s = src / "hp_backbone" / "pytorch_model.bin", src / "hp_scorer" / "mlp_pytorch_model.bin"
    if hp_b.is_file() and hp_s.is_file():
        return "hp", {"backbone": hp_b, "scorer": hp_s}
    if (src / "pytorch_model.bin").is_file():
        return "ict", {"ict": src / "pytorch_model.bin"}
    if not src.exists():
        raise InputError(f"{src} not found; give the folder of a downloaded 8y/ICT or 8y/HP copy")
    raise InputError(f"{src} is neither an 8y/ICT folder (pytorch_model.bin) nor an 8y/HP folder "
                     f"(hp_backbone/pytorch_model.bin + hp_scorer/mlp_pytorch_model.bin)")


def _storage(sd: dict[str, torch.Tensor], dtype: str | None, src: str) -> dict[str, torch.Tensor]:
    """Tensors as they will be stored: float only (an int8 tensor with the right shape is still wrong)."""
    import torch
    bad = sorted(k for k, v in sd.items() if not v.is_floating_point())
    if bad:
        raise ModelFileError(f"{src} holds tensors that are not float ({', '.join(bad[:3])}: {sd[bad[0]].dtype}); "
                             f"a quantised or altered checkpoint cannot be converted: use the released weights")
    if dtype is None:
        wide = sorted(k for k, v in sd.items() if v.dtype not in [getattr(torch, t) for t in _ST_DTYPES.values()])
        if wide:
            raise ModelFileError(f"{src} holds {sd[wide[0]].dtype} tensors ({wide[0]}); pass --dtype fp32 (or "
                                 f"bf16/fp16) to store them")
        return {k: v.contiguous() for k, v in sd.items()}
    return {k: v.to(getattr(torch, DTYPES[dtype])).contiguous() for k, v in sd.items()}


def convert(src: str | Path, out: str | Path, config_path: str | Path | None = None,
            dtype: str | None = None, known_sha256: dict[Path, str] | None = None) -> FileInfo:
    """Convert a released 8y/ICT or 8y/HP copy to one checked safetensors file (atomic write). `known_sha256`:
    source files' sha256 already checked by the caller (a download), so they are not read a second time."""
    from .files import sha256_file
    from .modeling import expected_hp_shapes, expected_ict_shapes

    src, out = Path(src), Path(out)
    if dtype is not None and dtype not in DTYPES:
        raise InputError(f"--dtype {dtype} is not one of {', '.join(DTYPES)}")
    kind, files = detect_layout(src)
    if config_path is None and kind == "hp" and (files["backbone"].parent / "config.json").exists():
        config_path = files["backbone"].parent / "config.json"  # save_pretrained wrote the backbone's own config
    if out.suffix.lower() in PICKLE_SUFFIXES:
        raise InputError(f"--out {out}: {out.suffix} is a pickle's name, and the file written is safetensors; "
                         f"name it {out.with_suffix('.safetensors').name}")
    check_new_file(out, [*files.values(), *([Path(config_path)] if config_path else [])], "--out")
    arch = arch_config.load_architecture(config_path)
    if kind == "ict":
        sd = _load_pickle(files["ict"])
        sd = {k: v for k, v in sd.items() if not k.endswith("position_ids")}
        _check_source(sd, expected_ict_shapes, files["ict"], arch)
        sources = {"ict": files["ict"]}
    else:
        backbone = {k: v for k, v in _load_pickle(files["backbone"]).items() if not k.endswith("position_ids")}
        _check_source(backbone, expected_ict_shapes, files["backbone"], arch)
        head = _load_pickle(files["scorer"])
        head_expected = {k[len("head."):]: v for k, v in expected_hp_shapes(arch).items() if k.startswith("head.")}
        _check_source(head, head_expected, files["scorer"])
        sd = {k: v for k, v in backbone.items() if k.startswith(("vision_model.", "visual_projection."))}
        sd.update({"head." + k: v for k, v in head.items()})
        sources = {"backbone": files["backbone"], "scorer": files["scorer"]}
    tensors = _storage(sd, dtype, str(src))
    log.info("converting %s (%s, %d tensors) -> %s", src, kind, len(tensors), out)
    metadata = {
        "format": "pt", META_VER: FORMAT_VERSION, META_KIND: kind, META_ARCH: arch_config.dumps(arch),
        META_SRC: ",".join(f"{k}={p.name}" for k, p in sources.items()),
        META_SHA: ",".join(f"{k}={(known_sha256 or {}).get(p) or sha256_file(p)}" for k, p in sources.items()),
    }
    from safetensors.torch import save_file

    atomic_write(out, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return read_info(out)
