"""Whole-file sha256 of model files, hashed once per file and remembered, as the webuis remember checkpoints.

The memo is a small SQLite file in the cache folder (`model-hashes.sqlite`), keyed by the file's
resolved path and valid while its (size, mtime, inode) stay the same; any number of processes may
share it (SQLite's own locking; a write that cannot be made is skipped, the hash is still right).
It needs no torch: `ict search` keys its gallery without importing it.
"""
from __future__ import annotations

import logging
import os
import sqlite3
import threading
from pathlib import Path

from .files import sha256_file

log = logging.getLogger(__name__)

MEMO_NAME = "model-hashes.sqlite"
_lock = threading.Lock()
_seen: dict[tuple, str] = {}  # this process's memo: (path, size, mtime_ns, inode) -> sha256


def _identity(path: Path) -> tuple:
    st = os.stat(path)
    return (os.fsencode(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino)


def _memo_file() -> Path:
    from .cache.keys import resolve_cache_dir

    return resolve_cache_dir(None) / MEMO_NAME


def _connect(create: bool) -> sqlite3.Connection | None:
    memo = _memo_file()
    if not create and not memo.is_file():
        return None
    if create:
        memo.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(memo, timeout=10)
    conn.execute("CREATE TABLE IF NOT EXISTS hashes(path BLOB PRIMARY KEY, size INTEGER, mtime_ns INTEGER, "
                 "inode INTEGER, sha256 TEXT)")
    return conn


def _remembered(key: tuple) -> str | None:
    try:
        conn = _connect(create=False)
        if conn is None:
            return None
        with conn:
            row = conn.execute("SELECT sha256 FROM hashes WHERE path=? AND size=? AND mtime_ns=? AND inode=?",
                               key).fetchone()
        conn.close()
    except (sqlite3.Error, OSError) as e:
        log.debug("model hash memo unreadable (%s); hashing", e)
        return None
    return row[0] if row and isinstance(row[0], str) and len(row[0]) == 64 else None


def _remember(key: tuple, digest: str) -> None:
    try:
        conn = _connect(create=True)
        with conn:
            conn.execute("INSERT OR REPLACE INTO hashes VALUES (?, ?, ?, ?, ?)", (*key, digest))
        conn.close()
    except (sqlite3.Error, OSError) as e:  # read-only or locked past the timeout: hashed again next time
        log.debug("model hash memo not written (%s)", e)


def file_hash(path: str | Path) -> str:
    """The whole file's sha256, from the memo when the file is unchanged since it was hashed."""
    path = Path(path)
    key = _identity(path)
    with _lock:
        digest = _seen.get(key) or _remembered(key)
    if digest is None:
        log.info("hashing %s (%.2f GB) once, to key the embedding cache", path, key[1] / 1e9)
        digest = sha256_file(path)
        if _identity(path) != key:  # changed while it was read: the hash is of no one version, never kept
            return digest
        with _lock:
            _remember(key, digest)
    with _lock:
        _seen[key] = digest
    return digest
