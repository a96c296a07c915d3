"""The Parquet output folder of a --ray job: its rows, what is already done, and the gallery ingest.

One row per input image. `score`: index, path, hash, prompt, ict, hp, hp_raw, score, error.
`index`: index, path, hash, gallery (the embedding cache's key of the models), embedding (the
L2-normalised ICT image feature, float32), hp_raw (the HP head's output, before its sigmoid), error.
`index` is the image's position in the job's input list (rows are written as batches finish: sort
by it to get the input order). `hash` is the sha256 of the file's bytes, the key the
embedding cache uses too. A re-run skips every image whose hash (or, for a file that could not be
read at all, whose path) already has a row, so a killed job loses only the batches in flight.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from ..errors import InputError
from . import INSTALL_HINT

log = logging.getLogger(__name__)

MANIFEST = "_ict_job.json"
BROKEN_PREFIX = "_broken-"     # pyarrow and Ray skip files starting with "_" when reading a folder
SCORE_COLUMNS = ("index", "path", "hash", "prompt", "ict", "hp", "hp_raw", "score", "error")
INDEX_COLUMNS = ("index", "path", "hash", "gallery", "embedding", "hp_raw", "error")


def need_pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError as e:  # absent, or present but unusable (pyarrow 25+ with numpy 1.x)
        why = "is not installed" if isinstance(e, ModuleNotFoundError) else f"cannot be imported ({e})"
        raise InputError(f"Parquet needs pyarrow, which {why}: {INSTALL_HINT}") from None
    return pyarrow


def schema(command: str):
    """The Arrow schema of one command's rows. The embedding is a variable-size list: a null (error)
    row in a fixed-size list column cannot be written by pyarrow < 25, the numpy 1.x line."""
    pa = need_pyarrow()
    f64, s = pa.float64(), pa.string()
    if command == "score":
        return pa.schema([("index", pa.int64()), ("path", s), ("hash", s), ("prompt", s), ("ict", f64),
                          ("hp", f64), ("hp_raw", f64), ("score", f64), ("error", s)])
    return pa.schema([("index", pa.int64()), ("path", s), ("hash", s), ("gallery", s),
                      ("embedding", pa.list_(pa.float32())),
                      ("hp_raw", f64), ("error", s)])


def done_key(path: str, digest: str | None) -> str:
    """The resume key of a row: its content hash; for a file that could not be read, its path."""
    return digest if digest else "path:" + path


def check_manifest(out: Path, job: dict) -> None:
    """Refuse to mix the rows of two different jobs (command, prompt, models, precision) in one folder."""
    path = out / MANIFEST
    if path.exists():
        try:
            have = json.loads(path.read_text())
        except (OSError, ValueError):
            have = None
        if have != job:
            diff = sorted(k for k in job if not isinstance(have, dict) or have.get(k) != job[k])
            raise InputError(f"{out} holds the results of another job (different {', '.join(diff) or 'settings'}); "
                             f"use another --out folder")
        return
    out.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(job, indent=1))
    tmp.replace(path)


def parquet_files(out: Path) -> list[Path]:
    return sorted(p for p in out.glob("*.parquet") if not p.name.startswith(("_", ".")))


def done_rows(out: Path) -> tuple[set[str], int, int]:
    """(resume keys, rows, error rows) of the folder. A file a killed job left half-written cannot be
    read: it is renamed `_broken-*` (kept, not deleted) and its images are done again."""
    if not out.exists():
        return set(), 0, 0
    pq = need_pyarrow().parquet
    keys: set[str] = set()
    rows = errors = 0
    for f in parquet_files(out):
        try:
            t = pq.read_table(f, columns=["path", "hash", "error"])
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a truncated file
            aside = f.with_name(BROKEN_PREFIX + f.name)
            log.warning("%s cannot be read (%s); moved aside to %s, its images will be done again",
                        f, str(e)[:80], aside.name)
            f.replace(aside)
            continue
        for path, digest, err in zip(*(t.column(c).to_pylist() for c in ("path", "hash", "error"))):
            keys.add(done_key(path, digest))
            errors += err is not None
        rows += t.num_rows
    return keys, rows, errors


def ingest(out: Path, cache, batch_rows: int = 4096) -> tuple[int, int]:
    """Add the rows of an `ict index --ray` output to the embedding cache's gallery (no image is encoded).

    Uses only EmbeddingCache.put_images/flush, the calls `ict index` makes. Returns (added, failed rows)."""
    import numpy as np

    pq = need_pyarrow().parquet
    files = parquet_files(out)
    if not files:
        raise InputError(f"{out} holds no Parquet files; pass the --out folder of `ict index --ray`")
    added = failed = 0
    for f in files:
        pf = pq.ParquetFile(f)
        names = pf.schema_arrow.names
        missing = [c for c in ("hash", "path", "gallery", "embedding", "hp_raw", "error") if c not in names]
        if missing:
            raise InputError(f"{f} is not an `ict index --ray` output (no {', '.join(missing)} column); "
                             f"--ingest takes the --out folder of `ict index --ray`")
        for batch in pf.iter_batches(batch_size=batch_rows,
                                     columns=["hash", "path", "gallery", "embedding", "hp_raw", "error"]):
            cols = batch.to_pydict()
            per_gallery: dict[str, dict] = {}
            for digest, path, gallery, emb, hp_raw, err in zip(*cols.values()):
                if err is not None or emb is None:
                    failed += 1
                    continue
                hp = None if hp_raw is None or hp_raw != hp_raw else float(hp_raw)
                per_gallery.setdefault(gallery, {})[digest] = (np.asarray(emb, dtype=np.float32), hp, path)
            for gallery, entries in per_gallery.items():
                cache.put_images(gallery, entries)
                added += len(entries)
            cache.flush()
    return added, failed
