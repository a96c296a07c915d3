"""The Parquet output folder of a --ray job: which files are its own, what is already done, the gallery ingest.

One row per input path. `score`: index, path, hash, prompt, ict, hp, hp_raw, score, error.
`index`: index, path, hash, gallery (the embedding cache's key of the models), embedding (the
L2-normalised ICT image feature, float32), hp_raw (the HP head's output, before its sigmoid), error.
`index` is the path's position in the job's input list, which the folder's manifest pins (rows are
written as batches finish: sort by it to get the input order). `hash` is the sha256 of the bytes read,
the key the embedding cache uses too. A re-run skips every input that already has a row, so a killed
job loses only the batches in flight.

The folder holds the manifest and files named `ict-rows-*.parquet`; it never holds anything else, and
nothing else in it is read, renamed or written.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from ..errors import ICTError, InputError
from . import INSTALL_HINT

log = logging.getLogger(__name__)

MANIFEST = "_ict_job.json"
ROWS_PREFIX = "ict-rows-"      # the files this tool writes (job.file_names)
BROKEN_PREFIX = "_broken-"     # pyarrow and Ray skip files starting with "_" when reading a folder


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


def shown(text: str) -> str:
    """A path or message as a Parquet string: a file name's bytes that are not UTF-8 (held by Python as
    surrogate escapes) are written as `\\xNN`."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def inputs_digest(paths: list[str]) -> dict:
    """What the manifest pins of a job's input list: its length and a hash of the paths in order."""
    h = hashlib.sha256()
    for p in paths:
        h.update(os.fsencode(p) if not isinstance(p, bytes) else p)
        h.update(b"\0")
    return {"count": len(paths), "sha256": h.hexdigest()}


def _own(name: str) -> bool:
    return name.startswith(ROWS_PREFIX) and name.endswith(".parquet")


def _foreign(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.name != MANIFEST and not _own(p.name)
                  and not p.name.startswith((BROKEN_PREFIX, ".")))


def check_out(out: Path, job: dict) -> None:
    """The --out folder is new, empty, or the folder of this same job (command, prompt, models, precision,
    input list); anything else is refused before any work, and nothing in it is touched."""
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file; --out takes a folder (new, or the --out of an earlier run)")
    path = out / MANIFEST
    if out.is_dir():
        foreign = _foreign(out)
        if not path.exists() and foreign:
            raise InputError(f"--out {out} holds files this tool did not write ({', '.join(foreign[:3])}"
                             f"{' ...' if len(foreign) > 3 else ''}); give a new or empty folder")
        if path.exists() and any(f.endswith(".parquet") for f in foreign):
            others = [f for f in foreign if f.endswith(".parquet")]
            raise InputError(f"--out {out} holds Parquet files this tool did not write ({', '.join(others[:3])}); "
                             f"move them elsewhere or give another folder")
    if path.exists():
        try:
            have = json.loads(path.read_text())
        except (OSError, ValueError):
            have = None
        if have != job:
            diff = sorted(k for k in job if not isinstance(have, dict) or have.get(k) != job[k])
            if diff == ["inputs"] and isinstance(have["inputs"], dict):
                raise InputError(f"{out} holds the rows of another input list ({have['inputs'].get('count')} paths, "
                                 f"{job['inputs']['count']} now): `index` is a position in that list, so a changed "
                                 f"list needs another --out folder")
            raise InputError(f"{out} holds the results of another job (different {', '.join(diff) or 'settings'}); "
                             f"use another --out folder")
        return
    try:
        out.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(job, indent=1))
        tmp.replace(path)
    except OSError as e:
        raise InputError(f"cannot write to --out {out} ({e.strerror or e}); give a writable folder") from None


def parquet_files(out: Path) -> list[Path]:
    """The row files this tool wrote in the folder (never another file)."""
    return sorted(p for p in out.glob(ROWS_PREFIX + "*.parquet") if p.is_file())


def done_rows(out: Path) -> tuple[set[int], int, int]:
    """(input indexes with a row, rows, error rows) of the folder. A file of this tool that a killed job
    left half-written cannot be read: it is renamed `_broken-*` (kept, not deleted) and its inputs are
    done again."""
    if not out.exists():
        return set(), 0, 0
    pq = need_pyarrow().parquet
    done: set[int] = set()
    rows = errors = 0
    for f in parquet_files(out):
        try:
            t = pq.read_table(f, columns=["index", "error"])
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a truncated file
            aside = f.with_name(BROKEN_PREFIX + f.name)
            log.warning("%s cannot be read (%s); moved aside to %s, its images will be done again",
                        f, str(e)[:80], aside.name)
            f.replace(aside)
            continue
        done.update(t.column("index").to_pylist())
        errors += t.num_rows - t.column("error").null_count
        rows += t.num_rows
    return done, rows, errors


def ingest(out: Path, cache, batch_rows: int = 4096) -> tuple[int, int]:
    """Add the rows of an `ict index --ray` output to the embedding cache's gallery (no image is encoded).

    Uses only EmbeddingCache.put_images/flush, the calls `ict index` makes, and counts as stored only the
    rows a fresh reader of the cache folder finds there afterwards. Returns (stored, error rows); raises
    ICTError when a row without an error could not be stored."""
    import numpy as np

    pq = need_pyarrow().parquet
    files = parquet_files(out)
    if not files:
        raise InputError(f"{out} holds no rows of `ict index --ray` ({ROWS_PREFIX}*.parquet); pass the --out "
                         f"folder of `ict index --ray`")
    columns = ["hash", "path", "gallery", "embedding", "hp_raw", "error"]
    stored = failed = lost = 0
    reader = type(cache)(cache.path)  # reads the database only: what another process would find
    try:
        for f in files:
            pf = pq.ParquetFile(f)
            missing = [c for c in columns if c not in pf.schema_arrow.names]
            if missing:
                raise InputError(f"{f} is not an `ict index --ray` output (no {', '.join(missing)} column); "
                                 f"--ingest takes the --out folder of `ict index --ray`")
            for batch in pf.iter_batches(batch_size=batch_rows, columns=columns):
                per_gallery: dict[str, dict] = {}
                for digest, path, gallery, emb, hp_raw, err in zip(*batch.to_pydict().values()):
                    if err is not None or emb is None:
                        failed += 1
                        continue
                    hp = None if hp_raw is None or hp_raw != hp_raw else float(hp_raw)
                    per_gallery.setdefault(gallery, {})[digest] = (np.asarray(emb, dtype=np.float32), hp, path)
                for gallery, entries in per_gallery.items():
                    cache.put_images(gallery, entries)
                cache.flush()
                for gallery, entries in per_gallery.items():
                    found = 0 if cache.memory_only else len(reader.get_images(gallery, list(entries)))
                    stored += found
                    lost += len(entries) - found
    finally:
        reader.close()
    if lost:
        raise ICTError(f"{lost} row(s) of {out} could not be stored in the gallery at {cache.path} (locked, "
                       f"read-only, or not a valid embedding); {stored} were: run `ict index --ingest {out}` again")
    return stored, failed
