"""A model file's identity for the caches: the hash of the whole file, hashed once and remembered."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sqlite3
import struct
import subprocess
import sys
from pathlib import Path

from ict_core.cli import main
from ict_core.weights import fingerprint

ROOT = Path(__file__).resolve().parents[1]


def _outside_samples(path: Path, name: str) -> tuple[int, int]:
    """(start, end) in the file of tensor `name`'s bytes; asserts they miss the 16 blocks of 4 KiB at
    size * i / 16 that a sampled fingerprint reads."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    a, b = json.loads(raw[8:8 + n])[name]["data_offsets"]
    start, end = 8 + n + a, 8 + n + b
    size = len(raw)
    assert all(end <= size * i // 16 or start >= size * i // 16 + 4096 for i in range(16)), "pick another tensor"
    return start, end


def test_two_models_differing_outside_any_sample_never_share_cached_prompts(tiny_models, images, tmp_path, capsys):
    """B is A with its text projection negated (bf16 sign bits flipped, in bytes no sampled block reads):
    `ict score` with B after A in the same cache must give B's own scores, not A's cached prompt features."""
    a = tiny_models.ict
    b = tmp_path / "b.safetensors"
    shutil.copy(a, b)
    start, end = _outside_samples(b, "text_projection.weight")
    raw = bytearray(b.read_bytes())
    for i in range(start + 1, end, 2):  # bf16, little-endian: the sign bit is in the second byte
        raw[i] ^= 0x80
    b.write_bytes(bytes(raw))

    def ict_of(model, *cache):
        argv = ["score", str(images[0]), "--prompt", "a red fox", "--model", str(model), "--no-hp", "--quiet",
                "--json", *cache]
        assert main(argv) == 0
        return json.loads(capsys.readouterr().out)["results"][0]["ict"]

    cache = ["--cache-dir", str(tmp_path / "cache")]
    with_a = ict_of(a, *cache)
    alone = ict_of(b, "--no-cache")
    assert abs(alone + with_a) < 1e-5 and abs(with_a) > 1e-4  # B's text features are -A's
    assert ict_of(b, *cache) == alone


def test_the_hash_is_of_the_whole_file_and_remembered(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setenv("ICT_CACHE_DIR", str(tmp_path / "cache"))
    f = tmp_path / "m.safetensors"
    shutil.copy(tiny_models.ict, f)
    whole = hashlib.sha256(f.read_bytes()).hexdigest()
    assert fingerprint(f) == whole[:24]
    memo = tmp_path / "cache" / "model-hashes.sqlite"
    with sqlite3.connect(memo) as conn:
        assert conn.execute("SELECT sha256 FROM hashes").fetchall() == [(whole,)]
    # another process finds it in the memo without reading the file: a planted value shows it was used
    with sqlite3.connect(memo) as conn:
        conn.execute("UPDATE hashes SET sha256=?", ("ab" * 32,))
    code = f"from ict_core.weights import fingerprint; print(fingerprint({str(f)!r}))"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert run.stdout.strip() == ("ab" * 32)[:24], run.stderr
    # a change of the file (same size, new mtime) is hashed again
    raw = bytearray(f.read_bytes())
    raw[-1] ^= 1
    f.write_bytes(bytes(raw))
    os.utime(f, ns=(1, 1))
    assert fingerprint(f) == hashlib.sha256(bytes(raw)).hexdigest()[:24]


def test_concurrent_processes_share_the_memo(tiny_models, tmp_path):
    """Four processes hash four files into one memo at once: every hash right, nothing raised."""
    files = []
    for i in range(4):
        f = tmp_path / f"m{i}.safetensors"
        shutil.copy(tiny_models.ict if i % 2 else tiny_models.hp, f)
        files.append(f)
    code = "import sys; from ict_core.weights import fingerprint; print(fingerprint(sys.argv[1]))"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "ICT_CACHE_DIR": str(tmp_path / "cache")}
    procs = [subprocess.Popen([sys.executable, "-c", code, str(f)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, cwd=ROOT, env=env) for f in files]
    for f, p in zip(files, procs):
        out, err = p.communicate(timeout=300)
        assert p.returncode == 0 and out.strip() == hashlib.sha256(f.read_bytes()).hexdigest()[:24], err
    with sqlite3.connect(tmp_path / "cache" / "model-hashes.sqlite") as conn:
        assert conn.execute("SELECT count(*) FROM hashes").fetchone() == (4,)
