"""Converting the released pickles to safetensors once, and loading safetensors (never a pickle) at run time."""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import config as arch_config
from .errors import InputError, ModelFileError

log = logging.getLogger(__name__)

FORMAT_VERSION = "1"
META_KIND, META_ARCH, META_SHA, META_SRC, META_VER = (
    "ict_reward.kind", "ict_reward.architecture", "ict_reward.source_sha256", "ict_reward.source",
    "ict_reward.format")
KINDS = ("ict", "hp")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_MAX_HEADER = 100 * 1024 * 1024


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


def _refuse_pickle(path: Path, head: bytes) -> None:
    if path.suffix.lower() in PICKLE_SUFFIXES or head[:2] == b"PK" or head[:1] == b"\x80":
        raise ModelFileError(
            f"{path} is a PyTorch pickle, which is never loaded at run time (it can run code); "
            f"convert it once with `ict convert {path.parent} --out model.safetensors`")


def read_info(path: str | Path) -> FileInfo:
    """Parse and check a safetensors header (cheap: no tensor data is read)."""
    path = Path(path)
    if not path.exists():
        raise ModelFileError(f"model file {path} not found; run `ict fetch` or give the path of a converted "
                             f".safetensors file")
    if path.is_dir():
        raise ModelFileError(f"{path} is a folder; give the converted .safetensors file (`ict convert {path} "
                             f"--out model.safetensors` makes one from a downloaded 8y/ICT or 8y/HP folder)")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        _refuse_pickle(path, head)
        bad = f"{path} is truncated or not a safetensors file; download or convert it again"
        if len(head) < 8:
            raise ModelFileError(bad)
        (n,) = struct.unpack("<Q", head)
        if n <= 0 or n > _MAX_HEADER or 8 + n > size:
            raise ModelFileError(bad)
        header_bytes = f.read(n)
    try:
        header = json.loads(header_bytes)
    except ValueError:
        raise ModelFileError(bad) from None
    meta = header.pop("__metadata__", None) or {}
    tensors: dict[str, tuple[str, tuple[int, ...]]] = {}
    end = 0
    try:
        for name, t in header.items():
            tensors[name] = (t["dtype"], tuple(t["shape"]))
            end = max(end, int(t["data_offsets"][1]))
    except (KeyError, TypeError, ValueError, IndexError):
        raise ModelFileError(bad) from None
    if 8 + n + end > size:
        raise ModelFileError(f"{path} is truncated ({size} bytes, its header needs {8 + n + end}); "
                             f"download or convert it again")
    kind = meta.get(META_KIND)
    if kind not in KINDS or META_ARCH not in meta:
        raise ModelFileError(f"{path} was not written by `ict convert` (no ict-reward metadata); "
                             f"convert the released weights with `ict convert`")
    try:
        arch = arch_config.architecture(json.loads(meta[META_ARCH]))
    except (ValueError, InputError):
        raise ModelFileError(f"{path} has an unreadable architecture record; convert it again") from None
    return FileInfo(path, kind, arch, meta, tensors, header_bytes, size)


def read_kind(path: str | Path) -> str:
    return read_info(path).kind


def fingerprint(path: str | Path, info: FileInfo | None = None) -> str:
    """Identity of a weight file for caches: header + size + 16 sampled 4 KiB blocks, never a full read."""
    info = info or read_info(path)
    h = hashlib.sha256(info.header_bytes)
    h.update(str(info.size).encode())
    with open(info.path, "rb") as f:
        for i in range(16):
            f.seek(info.size * i // 16)
            h.update(f.read(4096))
    return h.hexdigest()[:24]


# ------------------------------------------------------------------------------------------------------ loading
def _check_tensors(info: FileInfo, expected: dict[str, tuple[int, ...]]) -> None:
    got = {k: v[1] for k, v in info.tensors.items()}
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    shaped = sorted(k for k in set(got) & set(expected) if tuple(got[k]) != tuple(expected[k]))
    if missing or unexpected or shaped:
        raise ModelFileError(f"{info.path} does not match its own architecture record ({_describe(missing, unexpected, shaped, got, expected)}); convert it again")


_ST_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool}


def load_state(info: FileInfo, device: torch.device, dtype_for=None) -> dict[str, torch.Tensor]:
    """Stream tensors one by one from the file straight to `device`, cast there to `dtype_for(name)`.

    Plain reads (no mmap) and one tensor in flight keep peak memory at the size of the loaded model:
    a bf16 file loaded as fp32 never holds both copies of the weights."""
    header = json.loads(info.header_bytes)
    header.pop("__metadata__", None)
    base = 8 + len(info.header_bytes)
    state: dict[str, torch.Tensor] = {}
    try:
        with open(info.path, "rb", buffering=0) as f:
            for name, t in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                start, end = t["data_offsets"]
                src_dtype = _ST_DTYPES[t["dtype"]]
                buf = bytearray(end - start)
                f.seek(base + start)
                if f.readinto(buf) != len(buf):
                    raise EOFError("short read")
                x = torch.frombuffer(buf, dtype=src_dtype) if buf else torch.empty(0, dtype=src_dtype)
                x = x.reshape(t["shape"]).to(device)
                want = dtype_for(name) if dtype_for is not None and x.is_floating_point() else None
                state[name] = x.to(want) if want is not None else x
    except (OSError, EOFError, KeyError, RuntimeError, ValueError) as e:
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
    _check_tensors(info, expected_ict_shapes(info.arch) if kind == "ict" else expected_hp_shapes(info.arch))
    return info


# --------------------------------------------------------------------------------------------------- converting
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    """The one place a pickle is read: the converter, with weights_only=True (no code can run)."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise ModelFileError(f"cannot read {path} as a PyTorch checkpoint ({type(e).__name__}: {str(e)[:160]}); "
                             f"download it again") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ModelFileError(f"{path} does not hold a state dict of tensors; is it the right file?")
    return sd


def _describe(missing, unexpected, shaped, got, expected) -> str:
    parts = []
    if missing:
        parts.append(f"missing {len(missing)}: {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)}: {', '.join(unexpected[:4])}"
                     f"{' ...' if len(unexpected) > 4 else ''}")
    if shaped:
        parts.append("wrong shape: " + ", ".join(f"{k} {tuple(got[k])} != {tuple(expected[k])}"
                                                 for k in shaped[:4]))
    return "; ".join(parts)


def _check_source(sd: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], src: Path) -> None:
    got = {k: tuple(v.shape) for k, v in sd.items()}
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    shaped = sorted(k for k in set(got) & set(expected) if got[k] != tuple(expected[k]))
    if missing or unexpected or shaped:
        raise ModelFileError(f"{src} does not match the architecture ({_describe(missing, unexpected, shaped, got, expected)}); "
                             f"check the source folder or pass the right --config")


def detect_layout(src: Path) -> tuple[str, dict[str, Path]]:
    """Which released layout a folder (or file) is: 8y/ICT or 8y/HP."""
    if src.is_file():
        return "ict", {"ict": src}
    hp_b, hp_s = src / "hp_backbone" / "pytorch_model.bin", src / "hp_scorer" / "mlp_pytorch_model.bin"
    if hp_b.exists() and hp_s.exists():
        return "hp", {"backbone": hp_b, "scorer": hp_s}
    if (src / "pytorch_model.bin").exists():
        return "ict", {"ict": src / "pytorch_model.bin"}
    if not src.exists():
        raise InputError(f"{src} not found; give the folder of a downloaded 8y/ICT or 8y/HP copy")
    raise InputError(f"{src} is neither an 8y/ICT folder (pytorch_model.bin) nor an 8y/HP folder "
                     f"(hp_backbone/pytorch_model.bin + hp_scorer/mlp_pytorch_model.bin)")


def _atomic_save(tensors: dict[str, torch.Tensor], out: Path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=out.name + ".", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def convert(src: str | Path, out: str | Path, config_path: str | Path | None = None,
            dtype: str | None = None) -> FileInfo:
    """Convert a released 8y/ICT or 8y/HP copy to one checked safetensors file (atomic write)."""
    from .modeling import expected_hp_shapes, expected_ict_shapes

    src, out = Path(src), Path(out)
    if dtype is not None and dtype not in DTYPES:
        raise InputError(f"--dtype {dtype} is not one of {', '.join(DTYPES)}")
    kind, files = detect_layout(src)
    if config_path is None and kind == "hp" and (files["backbone"].parent / "config.json").exists():
        config_path = files["backbone"].parent / "config.json"  # save_pretrained wrote the backbone's own config
    arch = arch_config.load_architecture(config_path)
    if kind == "ict":
        sd = _load_pickle(files["ict"])
        sd = {k: v for k, v in sd.items() if not k.endswith("position_ids")}
        _check_source(sd, expected_ict_shapes(arch), files["ict"])
        sources = {"ict": files["ict"]}
    else:
        backbone = {k: v for k, v in _load_pickle(files["backbone"]).items() if not k.endswith("position_ids")}
        _check_source(backbone, expected_ict_shapes(arch), files["backbone"])
        head = _load_pickle(files["scorer"])
        head_expected = {k[len("head."):]: v for k, v in expected_hp_shapes(arch).items() if k.startswith("head.")}
        _check_source(head, head_expected, files["scorer"])
        sd = {k: v for k, v in backbone.items() if k.startswith(("vision_model.", "visual_projection."))}
        sd.update({"head." + k: v for k, v in head.items()})
        sources = {"backbone": files["backbone"], "scorer": files["scorer"]}
    target = DTYPES[dtype] if dtype else None
    tensors = {k: (v.to(target) if target is not None and v.is_floating_point() else v).contiguous()
               for k, v in sd.items()}
    log.info("converting %s (%s, %d tensors) -> %s", src, kind, len(tensors), out)
    metadata = {
        "format": "pt", META_VER: FORMAT_VERSION, META_KIND: kind, META_ARCH: arch_config.dumps(arch),
        META_SRC: ",".join(f"{k}={p.name}" for k, p in sources.items()),
        META_SHA: ",".join(f"{k}={_sha256(p)}" for k, p in sources.items()),
    }
    _atomic_save(tensors, out, metadata)
    return read_info(out)


# ----------------------------------------------------------------------------------------------------- fetching
REPOS = {"ict": "8y/ICT", "hp": "8y/HP"}
# sha256 of 8y/ICT's pytorch_model.bin as a mirror reports it (FACTS.md); a mismatch is worth a warning
KNOWN_ICT_SHA256 = "d5b86b0d5da463288650ed86d0409a28196f7514efa44cf63641297fb0e9832f"
_REPO_FILES = {"ict": ["pytorch_model.bin"],
               "hp": ["hp_backbone/pytorch_model.bin", "hp_backbone/config.json", "hp_scorer/mlp_pytorch_model.bin"]}


def fetch(kind: str, dest: Path, download_dir: Path | None = None) -> Path:
    """Download a released copy with huggingface_hub and convert it into `dest`; the only network use."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:  # pragma: no cover - a dependency
        raise ModelFileError("huggingface_hub is not installed; pip install huggingface_hub") from None
    repo = REPOS[kind]
    out = dest / (f"{kind}.safetensors")
    local = download_dir or dest / f".download-{kind}"
    try:
        for name in _REPO_FILES[kind]:
            hf_hub_download(repo, name, local_dir=str(local))
    except Exception as e:
        raise ModelFileError(
            f"could not download {repo} ({type(e).__name__}); without network, copy the {repo} folder from "
            f"elsewhere and run `ict convert FOLDER --out {out}`") from None
    info = convert(local, out)
    if download_dir is None:  # the pickles are not needed any more; a failed run keeps them for a resume
        import shutil

        shutil.rmtree(local, ignore_errors=True)
    got = info.metadata.get(META_SHA, "")
    if kind == "ict" and got != f"ict={KNOWN_ICT_SHA256}":
        log.warning("downloaded %s has sha256 %s, not the published %s; check the source",
                    repo, got.partition("=")[2], KNOWN_ICT_SHA256)
    return out

