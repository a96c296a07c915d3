"""The cache's storage: one SQLite database (WAL) of prompt features and image galleries.

Atomic commits, crash safety, many processes and eviction come from SQLite. A fault is one warning and a
store that keeps working: a damaged database is set aside; a folder that cannot be written turns the store
memory-only (a copy of what could be read); a write waiting past the timeout raises Busy (kept for later).
entries: prompts (kind 'p', name = text) and images (kind 'i', name = hash); id = insertion order (the
rankings' tie-break) = faiss id; crc guards each vector. meta: width, rows, changes (they age a faiss
index), largest norm and faiss state of each table.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sqlite3
import time
import zlib

import numpy as np

log = logging.getLogger("ict_core.cache")

DB_NAME = "cache.sqlite3"
SCHEMA = """
CREATE TABLE IF NOT EXISTS entries(id INTEGER PRIMARY KEY AUTOINCREMENT, kind TEXT NOT NULL, key TEXT NOT NULL,
    name BLOB NOT NULL, vec BLOB NOT NULL, crc INTEGER NOT NULL, hp REAL, label BLOB, used REAL NOT NULL,
    UNIQUE(kind, key, name));
CREATE INDEX IF NOT EXISTS lru ON entries(kind, key, used, id);
CREATE TABLE IF NOT EXISTS meta(kind TEXT, key TEXT, dim INTEGER, n INTEGER DEFAULT 0, edits INTEGER DEFAULT 0,
    xmax REAL DEFAULT 0, ix TEXT, PRIMARY KEY(kind, key));
"""
#: Rows per query when a gallery is read whole (8192 x 1024 x 4 B = 32 MB at a time).
CHUNK = 8192


class Busy(Exception):
    """The database stayed locked by another process's write past the timeout."""


class Foreign(sqlite3.DatabaseError):
    """The file is a valid SQLite database of another program: it is left untouched (never set aside)."""


def _check_ours(conn, file) -> None:
    """Foreign unless the database is empty or holds this cache's tables (and nothing else)."""
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")} - {"sqlite_sequence"}
    need = {"entries": {"id", "kind", "key", "name", "vec", "crc", "hp", "label", "used"},
            "meta": {"kind", "key", "dim", "n", "edits", "xmax", "ix"}}
    ours = not tables or (tables == set(need) and all(
        cols <= {r[1] for r in conn.execute(f"PRAGMA table_info({t})")} for t, cols in need.items()))
    if not ours:
        raise Foreign(f"{file} is an SQLite database of another program or format (tables: "
                      f"{', '.join(sorted(tables))[:200]}); it is left as it is: use another cache folder")


def text(s: str) -> bytes:
    return s.encode("utf-8", "surrogatepass")  # prompts and file names may hold lone surrogates


def untext(b) -> str:
    return bytes(b or b"").decode("utf-8", "surrogatepass")


def _nan(x) -> float:
    return math.nan if x is None else x


def vector(blob, crc: int) -> np.ndarray:
    if zlib.crc32(blob) != crc:
        raise sqlite3.DatabaseError("database disk image is malformed (a stored vector fails its checksum)")
    return np.frombuffer(blob, np.float32).copy()


def _fault(exc: Exception) -> str:
    if isinstance(exc, Foreign):
        return "foreign"
    msg = str(exc).lower()
    if "malformed" in msg or "not a database" in msg:
        return "damaged"
    return "busy" if "locked" in msg or "busy" in msg else "unwritable"


class Store:
    """The database of one cache folder; not thread-safe (EmbeddingCache locks)."""

    def __init__(self, folder, timeout: float, memory_only: bool = False):
        self.folder, self.file, self.timeout = folder, folder / DB_NAME, timeout
        self.conn, self.writable, self.memory_only = None, False, False
        self.problem: str | None = None  # why the store is memory-only when it did not choose to be
        if memory_only:
            self._go_memory(None)

    def _connect(self, write: bool):
        """(connection, writable); (None, False) when there is no database to read yet."""
        if not write and not self.file.exists():
            return None, False
        if write:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._set_aside_old_format()
        conn = sqlite3.connect(self.file, timeout=self.timeout, check_same_thread=False, isolation_level="IMMEDIATE")
        try:
            _check_ours(conn, self.file)
            conn.executescript("PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;" + SCHEMA)
            return conn, True
        except sqlite3.Error as exc:
            conn.close()
            if write or _fault(exc) != "unwritable":
                raise
        # a read-only folder: a WAL reader needs a -shm file it cannot make, so read the file as it is
        conn = sqlite3.connect(f"{self.file.resolve().as_uri()}?immutable=1", uri=True, check_same_thread=False)
        try:
            _check_ours(conn, self.file)
            conn.execute("SELECT count(*) FROM meta").fetchone()
        except sqlite3.Error:
            conn.close()
            raise
        return conn, False

    def run(self, fn, write: bool = False):
        """fn(connection), in one transaction when writing, faults handled (see the module docstring);
        None when there is nothing to read. Raises Busy."""
        for _ in range(3):
            try:
                if self.conn is None or (write and not self.writable):
                    conn, writable = self._connect(write)
                    if conn is None:
                        return None
                    self.close()
                    self.conn, self.writable = conn, writable
                with self.conn if write else contextlib.nullcontext():  # a write: one transaction, rolled back on error
                    return fn(self.conn)
            except (sqlite3.ProgrammingError, sqlite3.InterfaceError):
                raise  # a bug here, not a fault of the disk
            except (sqlite3.Error, OSError) as exc:
                fault = _fault(exc)
                if fault == "busy":
                    raise Busy(str(exc)) from None
                if self.memory_only:
                    raise
                self._set_aside(exc) if fault == "damaged" else self._go_memory(exc)
        raise RuntimeError("the cache database keeps failing")

    def write(self, fn):
        return self.run(fn, True)

    def select(self, sql: str, *params, each=None) -> list:
        """Rows of a query, each(row) if given (inside run: a damaged vector is handled there)."""
        return self.run(lambda c: [each(r) if each else r for r in c.execute(sql, params)]) or []

    def _by(self, sql: str, keys: list, *params, each=None) -> list:
        """select() with `IN (?)` in sql standing for the keys, 500 at a time."""
        return [row for s in range(0, len(keys), 500)
                for row in self.select(sql.replace("?)", ",".join("?" * len(keys[s:s + 500])) + ")"),
                                       *params, *keys[s:s + 500], each=each)]

    def _go_memory(self, exc) -> None:
        mem = sqlite3.connect(":memory:", check_same_thread=False, isolation_level="IMMEDIATE")
        if self.conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self.conn.backup(mem)  # keep what could be read
            self.conn.close()
        mem.executescript(SCHEMA)
        self.conn, self.writable, self.memory_only = mem, True, True
        if exc is not None:
            self.problem = (str(exc) if isinstance(exc, Foreign) else
                            f"cannot write to {self.folder} ({exc}): read-only, full or not a folder")
            log.warning("ict-reward cache: %s; keeping the cache in memory only", self.problem)

    def _set_aside(self, exc) -> None:
        self.close()
        aside = f"{DB_NAME}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
        try:
            for suffix in ("", "-wal", "-shm"):
                if (self.folder / (DB_NAME + suffix)).exists():
                    os.replace(self.folder / (DB_NAME + suffix), self.folder / (aside + suffix))
        except OSError as err:
            self._go_memory(err)
        log.warning("ict-reward cache: %s is unusable (%s); moved it to %s, starting the cache empty",
                    self.file, exc, aside)

    def _set_aside_old_format(self) -> None:
        """A cache of the first format (*.ictc files) is not read: moved aside, once."""
        old = [self.folder / d for d in ("prompts", "images") if any((self.folder / d).glob("*.ictc"))]
        for d in old:
            (self.folder / "old-format").mkdir(exist_ok=True)
            os.replace(d, self.folder / "old-format" / d.name)
        if old:
            log.warning("ict-reward cache: %s held a cache of an older format, now in old-format/ (run `ict index` "
                        "again for your galleries; prompts are encoded again once)", self.folder)

    def close(self) -> None:
        if self.conn is not None and not self.memory_only:
            self.conn.close()
            self.conn, self.writable = None, False

    def get(self, kind: str, key: str, names: list) -> dict:
        """{name: (id, vector, hp_raw or NaN)} for the stored names."""
        return dict(self._by("SELECT name, id, vec, crc, hp FROM entries WHERE kind=? AND key=? AND name IN (?)",
                             [text(n) for n in names], kind, key,
                             each=lambda r: (untext(r[0]), (r[1], vector(r[2], r[3]), _nan(r[4])))))

    def meta(self, kind: str, key: str) -> dict:
        row = self.select("SELECT dim, n, edits, xmax, ix FROM meta WHERE kind=? AND key=?", kind, key)
        dim, n, edits, xmax, ix = row[0] if row else (None, 0, 0, 0.0, None)
        return {"dim": dim, "n": n, "edits": edits, "xmax": xmax, "ix": json.loads(ix) if ix else None}

    def chunks(self, gallery: str, after: int = -1):
        """(ids, vectors, hp_raw) of the rows of a gallery with id > after, CHUNK rows at a time."""
        while len((chunk := _arrays(self.select("SELECT id, vec, crc, hp FROM entries NOT INDEXED WHERE id>? AND "
                                                "kind='i' AND key=? ORDER BY id LIMIT ?", int(after), gallery, CHUNK,
                                                each=_row)))[0]):
            yield chunk
            after = chunk[0][-1]

    def fetch(self, gallery: str, ids) -> tuple:
        """(ids, vectors, hp_raw) of those rows that still exist, in id order."""
        return _arrays(sorted(self._by("SELECT id, vec, crc, hp FROM entries NOT INDEXED WHERE kind='i' AND key=? "
                                       "AND id IN (?)", sorted(int(i) for i in ids), gallery, each=_row)))

    def hp_column(self, gallery: str) -> tuple:
        """(ids, hp_raw) of every row of a gallery, in id order."""
        rows = self.select("SELECT id, hp FROM entries WHERE kind='i' AND key=? ORDER BY id", gallery)
        return np.array([r[0] for r in rows], np.int64), np.array([_nan(r[1]) for r in rows], np.float32)

    def recent(self, kind: str, key: str, n: int) -> list:
        """The vectors of a table's n most recently used rows."""
        return self.select("SELECT vec, crc FROM entries WHERE kind=? AND key=? ORDER BY used DESC LIMIT ?", kind, key,
                           n, each=lambda r: vector(*r))

    def describe(self, ids) -> dict:
        """{id: (name, label, hp_raw or NaN)}, for search results."""
        rows = self._by("SELECT id, name, label, hp FROM entries NOT INDEXED WHERE id IN (?)", [int(i) for i in ids])
        return {id_: (untext(name), untext(label), _nan(hp)) for id_, name, label, hp in rows}

    def put(self, kind: str, key: str, items: list, now: float, cap: int, used: dict) -> None:
        """Record use times {id: time}, insert or replace (name, vector, hp_raw, label or None) items,
        then evict the least recently used rows (ties: oldest first) past `cap`."""
        rows = [(v.tobytes(), zlib.crc32(v), None if math.isnan(hp) else hp, None if label is None else text(label),
                 now, kind, key, text(name)) for name, v, hp, label in items]
        xmax = max(float(np.linalg.norm(v.astype(np.float64))) for _, v, _, _ in items)

        def fn(conn):
            conn.execute("INSERT INTO meta(kind, key, dim) VALUES(?, ?, ?) ON CONFLICT DO NOTHING",
                         (kind, key, len(items[0][1])))
            self.touch(used, conn)
            replaced = conn.executemany("UPDATE entries SET vec=?, crc=?, hp=?, label=?, used=? "
                                        "WHERE kind=? AND key=? AND name=?", rows).rowcount
            added = conn.executemany("INSERT OR IGNORE INTO entries(vec, crc, hp, label, used, kind, key, name) "
                                     "VALUES(?, ?, ?, ?, ?, ?, ?, ?)", rows).rowcount
            evicted = max(0, conn.execute("SELECT n FROM meta WHERE kind=? AND key=?", (kind, key)).fetchone()[0]
                          + added - cap)
            conn.execute("DELETE FROM entries WHERE id IN (SELECT id FROM entries WHERE kind=? AND key=? "
                         "ORDER BY used, id LIMIT ?)", (kind, key, evicted))
            conn.execute("UPDATE meta SET n=n+?, edits=edits+?, xmax=max(xmax, ?) WHERE kind=? AND key=?",
                         (added - evicted, replaced + evicted, xmax, kind, key))
        self.write(fn)

    def labels(self, gallery: str, names: list) -> dict:
        """{name: label} of a gallery's stored images among names."""
        return dict(self._by("SELECT name, label FROM entries WHERE kind='i' AND key=? AND name IN (?)",
                             [text(n) for n in names], gallery, each=lambda r: (untext(r[0]), untext(r[1]))))

    def relabel(self, gallery: str, labels: dict) -> None:
        """Set the label of stored images {name: label}; vectors and use times are kept."""
        rows = [(text(label), text(name)) for name, label in labels.items()]
        self.write(lambda c: c.executemany("UPDATE entries SET label=? WHERE kind='i' AND key=? AND name=?",
                                           [(lab, gallery, name) for lab, name in rows]))

    def touch(self, used: dict, conn=None) -> None:
        """Record use times {id: time}, in conn's transaction if given."""
        if conn is None:
            return self.write(lambda c: self.touch(used, c))
        conn.executemany("UPDATE entries SET used=max(used, ?) WHERE id=?", [(t, i) for i, t in used.items()])

    def set_ix(self, gallery: str, state: dict) -> None:
        self.write(lambda c: c.execute("UPDATE meta SET ix=? WHERE kind='i' AND key=?", (json.dumps(state), gallery)))

    def clear(self, kinds: list) -> None:
        """Delete the rows; each table's deleted rows count as edits, so another process's IVF index of them
        goes stale (a meta row deleted would restart the count)."""
        marks = ",".join("?" * len(kinds))
        self.write(lambda c: (c.execute(f"DELETE FROM entries WHERE kind IN ({marks})", kinds),
                              c.execute(f"UPDATE meta SET edits=edits+n, n=0, xmax=0, ix=NULL WHERE kind IN ({marks})",
                                        kinds)))
        with contextlib.suppress(sqlite3.Error):
            self.conn.execute("VACUUM")  # give the space back


def _row(r) -> tuple:
    return r[0], vector(r[1], r[2]), _nan(r[3])


def _arrays(rows) -> tuple:
    return (np.array([r[0] for r in rows], np.int64), np.stack([r[1] for r in rows]) if rows else np.empty((0, 0)),
            np.array([r[2] for r in rows], np.float32))
