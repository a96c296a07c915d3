"""A local HTTP server that answers as the Hugging Face hub does for file downloads, so that huggingface_hub (and so
`ict fetch`, the ComfyUI loader's download choice and the webui's action) can be tested without the internet.

It serves `/{repo}/resolve/{revision}/{path}` for HEAD and GET with the hub's headers (X-Repo-Commit,
X-Linked-Etag: the sha256 of an LFS file or the git blob sha1 of a small one, X-Linked-Size) and byte ranges, from
a folder per repository. Knobs for the tests: `corrupt` (serve other bytes than the checksum published),
`stall_after` (send that many bytes of a file once, then hang until `release` is set, then drop the connection),
and `requests` (what was asked, with the Range header).
"""
from __future__ import annotations

import hashlib
import http.server
import re
import threading
from pathlib import Path
from urllib.parse import unquote

COMMIT = "0123456789abcdef0123456789abcdef01234567"
LFS_SUFFIXES = (".bin", ".safetensors", ".pt")


def _checksum(data: bytes, name: str) -> str:
    if name.endswith(LFS_SUFFIXES):
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    def __init__(self, repos: dict[str, Path]):
        self.repos = {k: Path(v) for k, v in repos.items()}
        self.corrupt: set[str] = set()           # "repo/path" served with one byte changed
        self.stall_after: dict[str, int] = {}    # "repo/path" -> bytes sent before the server hangs
        self.requests: list[tuple[str, str, str | None]] = []   # (method, "repo/path", Range header)
        self.release = threading.Event()
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _file(self):
                m = re.fullmatch(r"/(.+?/.+?)/resolve/([^/]+)/(.+)", unquote(self.path.split("?")[0]))
                if not m or m.group(1) not in hub.repos:
                    return None, None
                f = hub.repos[m.group(1)] / m.group(3)
                return (f"{m.group(1)}/{m.group(3)}", f) if f.is_file() else (f"{m.group(1)}/{m.group(3)}", None)

            def _headers(self, key, data, status, length, extra=()):
                self.send_response(status)
                self.send_header("X-Repo-Commit", COMMIT)
                etag = _checksum(data, key)
                self.send_header("ETag", f'"{etag}"')
                if key.endswith(LFS_SUFFIXES):
                    self.send_header("X-Linked-Etag", f'"{etag}"')
                    self.send_header("X-Linked-Size", str(len(data)))
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(length))
                for k, v in extra:
                    self.send_header(k, v)
                self.end_headers()

            def _answer(self, head: bool):
                key, f = self._file()
                hub.requests.append((self.command, key or self.path, self.headers.get("Range")))
                if f is None:
                    self.send_response(404)
                    self.send_header("X-Error-Code", "EntryNotFound")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                data = f.read_bytes()
                start = 0
                rng = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range") or "")
                if rng and not head:
                    start = int(rng.group(1))
                    end = int(rng.group(2)) if rng.group(2) else len(data) - 1
                    body = data[start:end + 1]
                    self._headers(key, data, 206, len(body),
                                  [("Content-Range", f"bytes {start}-{start + len(body) - 1}/{len(data)}")])
                else:
                    body = data
                    self._headers(key, data, 200, len(data))
                if head:
                    return
                if key in hub.corrupt:
                    body = bytes([body[0] ^ 0xFF]) + body[1:]
                stall = hub.stall_after.get(key)
                if stall is not None and start < stall:
                    del hub.stall_after[key]  # once: the next request (a resume) gets the rest
                    self.wfile.write(body[:stall - start])
                    self.wfile.flush()
                    hub.release.wait(120)
                    self.close_connection = True  # the transfer breaks off, as a dropped connection does
                    return
                self.wfile.write(body)

            def do_HEAD(self):
                self._answer(True)

            def do_GET(self):
                self._answer(False)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()

    def gets(self, key: str) -> list[str | None]:
        """The Range headers of the GETs of one file, in order."""
        return [r for m, k, r in self.requests if m == "GET" and k == key]
