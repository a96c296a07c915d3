"""On-disk format, atomic writes and cross-process locks for the embedding cache.

One table (all prompts of one model, or all images of one gallery) is ONE file, so a save is a
single atomic rename: a reader sees the old table or the new one, never an index from one save
and a sidecar from another. The file carries a checksum so a torn or garbled file is detected
instead of being trusted.

Layout (little-endian)::

    magic     8 bytes   b"ICTCACHE"
    version   u16       FORMAT_VERSION
    flags     u16       0
    hdr_len   u32       length of the JSON header
    pay_len   u64       length of the payload
    sha256    32 bytes  of header + payload
    header    JSON      {"kind", "key", "count", "dim", "next_id", "saved_at", "arrays"}; padded
                        with spaces so the payload starts 64-byte aligned; small, read by stats
    payload   raw little-endian arrays at the offsets "arrays" gives: ids int64[n],
                        vectors float32[n,d], used float64[n], hp_raw float32[n] (images) and
                        sidecar uint8 (JSON: keys, labels)

Raw arrays rather than .npz: loading is one read into a buffer the arrays then view (no zip, no
second copy), which matters for a 400 MB gallery that `ict search` loads on every run.
The vectors with their stable int64 ids are exactly what a faiss IndexIDMap2(IndexFlatIP) holds;
the index itself is rebuilt in memory on load, so the file does not depend on faiss being
importable (numpy fallback) or on the faiss build (CPU/GPU, version).
No pickle anywhere.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import struct
import time
from pathlib import Path

import numpy as np

MAGIC = b"ICTCACHE"
FORMAT_VERSION = 1
_PREFIX = struct.Struct("<8sHHIQ32s")
SUFFIX = ".ictc"

#: Test hook: seconds to sleep after each written MiB, so a test can kill a save half-way.
SLOW_WRITE_ENV = "ICT_CACHE_DEBUG_SLOW_WRITE"
_CHUNK = 1 << 20


class CorruptFile(Exception):
    """The file exists but is not a valid table for the expected kind and key."""


class LockTimeout(Exception):
    """Another process held the lock for too long; the save is retried at the next flush."""


@dataclasses.dataclass
class TableData:
    """Plain arrays of one table, as stored on disk (rows in id order)."""

    kind: str
    key: str
    dim: int
    next_id: int
    keys: list
    ids: np.ndarray
    vectors: np.ndarray
    used: np.ndarray
    hp_raw: np.ndarray | None = None
    labels: list | None = None

    @property
    def count(self) -> int:
        return len(self.keys)


_ALIGN = 64
_DTYPES = {"<i8": np.int64, "<f4": np.float32, "<f8": np.float64, "|u1": np.uint8}


def encode(data: TableData) -> list:
    """Serialise a table into the checksummed file format, as a list of buffers to write in order."""
    sidecar = {"keys": list(data.keys)}
    arrays = {
        "ids": np.ascontiguousarray(data.ids, dtype="<i8"),
        "vectors": np.ascontiguousarray(data.vectors, dtype="<f4").reshape(data.count, data.dim),
        "used": np.ascontiguousarray(data.used, dtype="<f8"),
    }
    if data.kind == "images":
        sidecar["labels"] = list(data.labels)
        arrays["hp_raw"] = np.ascontiguousarray(data.hp_raw, dtype="<f4")
    arrays["sidecar"] = np.frombuffer(json.dumps(sidecar).encode("utf-8"), dtype="|u1")
    table, chunks, offset = {}, [], 0
    for name, arr in arrays.items():
        pad = -offset % _ALIGN
        if pad:
            chunks.append(b"\0" * pad)
            offset += pad
        table[name] = {"dtype": arr.dtype.str, "shape": list(arr.shape), "offset": offset, "nbytes": arr.nbytes}
        chunks.append(memoryview(arr).cast("B") if arr.size else b"")
        offset += arr.nbytes
    header = json.dumps(
        {"kind": data.kind, "key": data.key, "count": data.count, "dim": data.dim,
         "next_id": int(data.next_id), "saved_at": time.time(), "arrays": table}
    ).encode("utf-8")
    header += b" " * (-(_PREFIX.size + len(header)) % _ALIGN)
    digest = hashlib.sha256(header)
    for chunk in chunks:
        digest.update(chunk)
    prefix = _PREFIX.pack(MAGIC, FORMAT_VERSION, 0, len(header), offset, digest.digest())
    return [prefix, header, *chunks]


def _split(blob) -> tuple[dict, memoryview]:
    if len(blob) < _PREFIX.size:
        raise CorruptFile(f"truncated ({len(blob)} bytes)")
    magic, version, _flags, hdr_len, pay_len, digest = _PREFIX.unpack_from(blob)
    if magic != MAGIC:
        raise CorruptFile("not an ict-reward cache file")
    if version != FORMAT_VERSION:
        raise CorruptFile(f"format version {version}, this build reads {FORMAT_VERSION}")
    end = _PREFIX.size + hdr_len + pay_len
    if len(blob) != end:
        raise CorruptFile(f"{len(blob)} bytes, header says {end} (truncated or torn)")
    view = memoryview(blob)
    if hashlib.sha256(view[_PREFIX.size:]).digest() != digest:
        raise CorruptFile("checksum mismatch")
    try:
        header = json.loads(bytes(view[_PREFIX.size:_PREFIX.size + hdr_len]).decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CorruptFile(f"bad header: {exc}") from None
    if not isinstance(header, dict):
        raise CorruptFile("bad header")
    return header, view[_PREFIX.size + hdr_len:]


def _array(payload: memoryview, spec) -> np.ndarray:
    dtype = _DTYPES[spec["dtype"]]
    shape = tuple(int(x) for x in spec["shape"])
    offset, nbytes = int(spec["offset"]), int(spec["nbytes"])
    count = int(np.prod(shape, dtype=np.int64))
    if offset < 0 or nbytes != count * np.dtype(dtype).itemsize or offset + nbytes > len(payload):
        raise ValueError("array out of bounds")
    arr = np.frombuffer(payload, dtype=np.dtype(spec["dtype"]), count=count, offset=offset).reshape(shape)
    return arr.astype(dtype, copy=False)  # native byte order; a view when the machine is little-endian


def decode(blob, kind: str, key: str) -> TableData:
    """Parse and validate a file; raise CorruptFile for anything garbled, truncated or foreign.

    With a bytearray blob the arrays are writable views into it (no copy)."""
    header, payload = _split(blob)
    if header.get("kind") != kind or header.get("key") != key:
        raise CorruptFile(f"holds {header.get('kind')!r} of {header.get('key')!r}, expected {kind!r} of {key!r}")
    try:
        specs = header["arrays"]
        arrays = {name: _array(payload, specs[name]) for name in ("ids", "vectors", "used", "sidecar")}
        side = json.loads(arrays["sidecar"].tobytes().decode("utf-8"))
        keys = side["keys"]
        ids, vectors, used = arrays["ids"], arrays["vectors"], arrays["used"]
        n, dim = len(keys), int(header["dim"])
        ok = (
            ids.shape == (n,) and vectors.shape == (n, dim) and used.shape == (n,)
            and int(header["count"]) == n and all(isinstance(k, str) for k in keys)
            and len(set(keys)) == n and len(np.unique(ids)) == n
        )
        hp_raw = labels = None
        if kind == "images":
            hp_raw = _array(payload, specs["hp_raw"])
            labels = side["labels"]
            ok = ok and hp_raw.shape == (n,) and len(labels) == n and all(isinstance(x, str) for x in labels)
        next_id = int(header["next_id"])
        ok = ok and (n == 0 or next_id > int(ids.max()))
    except Exception as exc:  # any parse failure of a checksummed-but-foreign payload
        raise CorruptFile(f"bad payload: {type(exc).__name__}: {exc}") from None
    if not ok:
        raise CorruptFile("inconsistent arrays")
    return TableData(kind, key, dim, next_id, list(keys), ids, vectors, used, hp_raw, labels)


def read_header(path: Path) -> dict | None:
    """Header only (no checksum): cheap counts for stats. None if unreadable."""
    try:
        with open(path, "rb") as fh:
            prefix = fh.read(_PREFIX.size)
            magic, version, _f, hdr_len, _p, _d = _PREFIX.unpack(prefix)
            if magic != MAGIC or version != FORMAT_VERSION or hdr_len > 1 << 20:
                return None
            header = json.loads(fh.read(hdr_len).decode("utf-8"))
            return header if isinstance(header, dict) else None
    except (OSError, ValueError, struct.error, UnicodeDecodeError):
        return None


def signature(path: Path):
    """Identity of the file now on disk (changes on every replace); None when absent."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def read_bytes(path: Path) -> tuple[bytearray, tuple] | None:
    """Whole file (a bytearray, so decoded arrays can view it) plus the signature of what was read;
    None when absent."""
    try:
        with open(path, "rb") as fh:
            st = os.fstat(fh.fileno())
            buf = bytearray(st.st_size)  # writers never modify a file in place, only replace it
            got = fh.readinto(buf)
            del buf[got:]
            return buf, (st.st_ino, st.st_size, st.st_mtime_ns)
    except FileNotFoundError:
        return None


def _fsync_dir(folder: Path) -> None:
    if os.name != "posix":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a directory; the rename is still atomic
    finally:
        os.close(fd)


def tmp_prefix(path: Path) -> str:
    return path.name + ".tmp-"


def atomic_write(path: Path, chunks) -> None:
    """Temp file in the same folder, fsync, os.replace, fsync folder. Raises OSError.

    chunks: bytes-like buffers written in order (what encode returns)."""
    if isinstance(chunks, (bytes, bytearray, memoryview)):
        chunks = [chunks]
    tmp = path.with_name(f"{tmp_prefix(path)}{os.getpid()}-{os.urandom(4).hex()}")
    delay = float(os.environ.get(SLOW_WRITE_ENV) or 0)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o644)
    try:
        try:
            for chunk in chunks:
                view = memoryview(chunk).cast("B")
                for start in range(0, len(view), _CHUNK):
                    part = view[start:start + _CHUNK]
                    while part:
                        part = part[os.write(fd, part):]
                    if delay:
                        time.sleep(delay)
            os.fsync(fd)
        finally:
            os.close(fd)
        _replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)


def _replace(src: Path, dst: Path) -> None:
    # On Windows a reader holding dst open makes os.replace fail for a moment: retry briefly.
    for attempt in range(10):
        try:
            os.replace(src, dst)
            return
        except PermissionError:
            if os.name != "nt" or attempt == 9:
                raise
            time.sleep(0.05)


def remove_stale_temps(path: Path) -> None:
    """Temp files left by a killed writer. Call only while holding the table's lock."""
    prefix = tmp_prefix(path)
    try:
        names = os.listdir(path.parent)
    except OSError:
        return
    for name in names:
        if name.startswith(prefix):
            try:
                os.unlink(path.parent / name)
            except OSError:
                pass


class FileLock:
    """Exclusive cross-process lock on a side file (flock on POSIX, msvcrt on Windows).

    Opening the lock file raises OSError on a read-only folder: the caller turns that into
    memory-only mode. The OS drops the lock when a holder dies, even by SIGKILL.
    """

    def __init__(self, path: Path, timeout: float = 30.0):
        self.path = path
        self.timeout = timeout
        self._fd = None

    def __enter__(self):
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.timeout
        pause = 0.002
        while True:
            try:
                _lock(fd)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise LockTimeout(str(self.path)) from None
                time.sleep(pause)
                pause = min(pause * 2, 0.05)
            except BaseException:
                os.close(fd)
                raise
        self._fd = fd
        return self

    def __exit__(self, *exc):
        fd, self._fd = self._fd, None
        try:
            _unlock(fd)
        finally:
            os.close(fd)


try:
    import fcntl

    def _lock(fd):
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    def _unlock(fd):
        fcntl.flock(fd, fcntl.LOCK_UN)

except ImportError:  # Windows
    try:
        import msvcrt

        def _lock(fd):
            os.lseek(fd, 0, os.SEEK_SET)
            try:
                msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            except OSError as exc:
                raise BlockingIOError(str(exc)) from None

        def _unlock(fd):
            os.lseek(fd, 0, os.SEEK_SET)
            msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)

    except ImportError:  # no locking primitive at all: single-process use only

        def _lock(fd):
            return None

        def _unlock(fd):
            return None
