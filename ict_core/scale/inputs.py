"""What a --ray job reads: image files, folders, and lists of image paths (text or Parquet).

A list file lets a dataset of any size be described without expanding a folder on the driver: a
`.txt`/`.lst` file holds one path or URI per line (blank lines and `#` comments skipped); a
`.parquet` file (or a folder of them) holds a column named `image` or `path`.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from ..errors import InputError
from ..files import IMAGE_SUFFIXES, folder_images

LIST_SUFFIXES = (".txt", ".lst")
COLUMNS = ("image", "path")


def is_uri(item: str) -> bool:
    return "://" in item


def _local(item: str) -> str:
    """Absolute local paths: Ray workers do not share the driver's working directory."""
    return item if is_uri(item) else str(Path(item).resolve())


def _text_list(path: Path, base: Path) -> Iterable[str]:
    with open(path, encoding="utf-8", errors="surrogateescape") as f:  # file names need not be UTF-8
        for line in f:
            line = line.strip()
            if line and not line.startswith("#"):
                yield line if is_uri(line) or Path(line).is_absolute() else str(base / line)


def _parquet_list(path: Path) -> list[str]:
    from .output import need_pyarrow

    pq = need_pyarrow().parquet
    schema = pq.read_schema(path) if path.is_file() else None
    names = schema.names if schema is not None else pq.ParquetDataset(path).schema.names
    col = next((c for c in COLUMNS if c in names), None)
    if col is None:
        raise InputError(f"{path}: a Parquet list needs a column named 'image' or 'path'; it has "
                         f"{', '.join(names[:8]) or 'no columns'}")
    values = pq.read_table(path, columns=[col]).column(col).to_pylist()
    base = path.parent if path.is_file() else path
    return [v if is_uri(v) or Path(v).is_absolute() else str(base / v) for v in values if v]


def _is_parquet(p: Path) -> bool:
    return p.suffix.lower() == ".parquet" or (p.is_dir() and any(p.glob("*.parquet")) and not _has_images(p))


def _has_images(folder: Path) -> bool:
    return any(f.suffix.lower() in IMAGE_SUFFIXES for f in folder.iterdir())


def expand(items: Sequence[str]) -> list[str]:
    """Every input image as an absolute path or a URI, in input order (folders sorted, recursively)."""
    out: list[str] = []
    for item in items:
        p = Path(item)
        if is_uri(item):
            out.append(item)
        elif p.suffix.lower() in LIST_SUFFIXES and p.is_file():
            out.extend(_local(x) for x in _text_list(p, p.resolve().parent))
        elif p.exists() and _is_parquet(p):
            out.extend(_local(x) for x in _parquet_list(p))
        elif p.is_dir():
            out.extend(str(f.resolve()) for f in folder_images(p))
        else:  # a missing file is scored as an error row, as the plain path does
            out.append(_local(item))
    if not out:
        raise InputError("no images given (folders and lists were empty); pass image files, folders, or a "
                         ".txt/.parquet list of image paths")
    return out
