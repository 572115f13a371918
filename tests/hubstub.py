"""A loopback stand-in for the Hugging Face Hub: enough of its HTTP API for `huggingface_hub` to download from.

`HubStub({"org/name": folder, ...})` serves each folder as a repo at one commit, on 127.0.0.1:
- `GET /api/models/{repo}/revision/{rev}`: the repo's info (id, sha, siblings with sizes);
- `GET /api/models/{repo}/tree/{rev}`: its files (path, size, oid; weights as LFS with their sha256);
- `HEAD|GET /{repo}/resolve/{rev}/{file}`: the file, with ETag, X-Repo-Commit, Content-Length and Range support.
Errors carry the Hub's X-Error-Code (RepoNotFound, RevisionNotFound, GatedRepo, EntryNotFound) so the client
raises its own typed errors. `cut_once` names files whose first GET stops at 90% (a dropped connection);
`hold_once` names files whose first GET pauses at 90% until `release()` (a download caught in the middle,
however slowly the test looks; the client's read timeout, HF_HUB_DOWNLOAD_TIMEOUT, must outlast the pause);
`throttle` (bytes/s) slows file bodies so a test can watch progress; `corrupt` names files whose bytes are
served with one bit flipped (the listing keeps the true checksums). `requests` logs (method, path, Range).
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


class HubStub:
    def __init__(self, repos: dict[str, Path], gated: tuple[str, ...] = (), cut_once: tuple[str, ...] = (),
                 throttle: int | None = None, corrupt: tuple[str, ...] = (), hold_once: tuple[str, ...] = ()):
        self.repos = {r: Path(p) for r, p in repos.items()}
        self.gated = set(gated)
        self.cut_once = set(cut_once)
        self.hold_once = set(hold_once)
        self.released = threading.Event()
        self.throttle = throttle
        self.corrupt = set(corrupt)
        self.requests: list[tuple[str, str, str | None]] = []
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                stub.handle(self, head=True)

            def do_GET(self):
                stub.handle(self, head=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def release(self) -> None:
        """Let a held download go on."""
        self.released.set()

    def stop(self) -> None:
        self.release()
        self.server.shutdown()
        self.server.server_close()

    @staticmethod
    def commit(repo: str) -> str:
        return hashlib.sha1(repo.encode()).hexdigest()

    def files(self, repo: str) -> dict[str, Path]:
        return {p.name: p for p in sorted(self.repos[repo].iterdir()) if p.is_file()}

    # ---- request handling ------------------------------------------------------------------------------------

    def handle(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        path = unquote(urlsplit(h.path).path)
        with self.lock:
            self.requests.append((h.command, path, h.headers.get("Range")))
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] in ("revision", "tree"):
            repo, kind, rev = "/".join(parts[2:4]), parts[4], parts[5]
            if not self._check(h, repo, rev):
                return
            files = self.files(repo)
            if kind == "revision":
                body = {"id": repo, "modelId": repo, "sha": self.commit(repo), "private": False,
                        "gated": "auto" if repo in self.gated else False,
                        "siblings": [{"rfilename": n, "size": p.stat().st_size} for n, p in files.items()]}
            else:
                body = [self._entry(n, p) for n, p in files.items()]
            self._send(h, 200, json.dumps(body).encode(), {"Content-Type": "application/json"}, head)
        elif len(parts) >= 5 and parts[2] == "resolve":
            repo, rev, name = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
            if not self._check(h, repo, rev):
                return
            file = self.files(repo).get(name)
            if file is None:
                self._error(h, 404, "EntryNotFound", f"{name} does not exist", head)
                return
            self._send_file(h, name, file, head)
        else:
            self._error(h, 404, None, "not found", head)

    def _check(self, h, repo: str, rev: str) -> bool:
        if repo not in self.repos:
            self._error(h, 401, "RepoNotFound", "Repository not found")
            return False
        if repo in self.gated and "authorization" not in {k.lower() for k in h.headers}:
            self._error(h, 401, "GatedRepo", "Access to this model is restricted")
            return False
        if rev not in ("main", self.commit(repo)):
            self._error(h, 404, "RevisionNotFound", "Invalid rev id")
            return False
        return True

    def _entry(self, name: str, path: Path) -> dict:
        data = path.read_bytes()
        entry = {"type": "file", "path": name, "size": len(data),
                 "oid": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()}
        if name.endswith((".safetensors", ".bin")):
            entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return entry

    def _send_file(self, h, name: str, path: Path, head: bool) -> None:
        data = path.read_bytes()
        if name in self.corrupt:
            data = data[:-1] + bytes([data[-1] ^ 1])
        size = len(data)
        headers = {"ETag": f'"{hashlib.sha256(data).hexdigest()}"', "X-Repo-Commit": self.commit(
            "/".join(urlsplit(h.path).path.strip("/").split("/")[:2])), "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream"}
        start, status = 0, 200
        rng = h.headers.get("Range")
        if rng and rng.startswith("bytes=") and not head:
            start = int(rng[6:].split("-")[0])
            status = 206
            headers["Content-Range"] = f"bytes {start}-{size - 1}/{size}"
        body = data[start:]
        if head:
            self._send(h, 200, b"", {**headers, "Content-Length": str(size)}, head=True)
            return
        h.send_response(status)
        for k, v in {**headers, "Content-Length": str(len(body))}.items():
            h.send_header(k, v)
        h.end_headers()
        cut = hold = None
        with self.lock:
            if name in self.cut_once:
                self.cut_once.discard(name)
                cut = len(body) * 9 // 10  # past huggingface_hub's 10 MB read size, so some of it is kept
            if name in self.hold_once:
                self.hold_once.discard(name)
                hold = len(body) * 9 // 10
        step = 16384
        for i in range(0, len(body) if cut is None else cut, step):
            if hold is not None and i >= hold:
                h.wfile.flush()
                self.released.wait(120)
                hold = None
            h.wfile.write(body[i:min(i + step, cut if cut is not None else len(body))])
            if self.throttle:
                time.sleep(step / self.throttle)
        h.wfile.flush()
        if cut is not None:  # a dropped connection: the client sees a short body
            h.close_connection = True
            h.connection.shutdown(2)

    def _error(self, h, status: int, code: str | None, message: str, head: bool = False) -> None:
        headers = {"Content-Type": "application/json", "X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._send(h, status, json.dumps({"error": message}).encode(), headers, head)

    @staticmethod
    def _send(h, status: int, body: bytes, headers: dict[str, str], head: bool = False) -> None:
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        if "Content-Length" not in headers:
            h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if not head:
            h.wfile.write(body)
