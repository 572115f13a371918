"""`quill push MODEL_DIR NAME`: upload a checkpoint folder to a server's model store and publish it.

Each file goes up with tus (the `tuspy` client) in chunks, each chunk with an Upload-Checksum; the upload
URLs are kept in a small resume file under the user's cache dir, so running the same command again after an
interruption (network, Ctrl-C, a server restart) continues every file from the offset the server reports.
Then the files are committed with their SHA-256s: the server verifies and checks them and publishes the model.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from quill.errors import QuillError
from quill.atomic import write_json_durably
from quill.store import StoreError, file_kind, parse_size, sha256_file, validate_file_name, validate_model_name

DEFAULT_CHUNK = "2MB"


class PushError(QuillError):
    """A push that failed: the message is one line."""


def register(subparsers) -> None:
    p = subparsers.add_parser("push", help="upload a model folder to a server's model store (resumable)",
                              description="Upload every file of MODEL_DIR to the model store of a `quill serve` "
                                          "server with tus (resumable: run it again to continue), then commit "
                                          "them as NAME with their SHA-256s.")
    p.add_argument("model_dir", metavar="MODEL_DIR", help="checkpoint folder (config.json, model.safetensors, ...)")
    p.add_argument("name", metavar="NAME", help="model name in the store")
    p.add_argument("--url", default="http://127.0.0.1:8000", help="server URL (default http://127.0.0.1:8000)")
    p.add_argument("--admin-key", default=None, help="the server's admin key (default: $QUILL_ADMIN_KEY)")
    p.add_argument("--chunk-size", default=DEFAULT_CHUNK, help=f"bytes per request, e.g. 2MB, 512KiB (default "
                                                             f"{DEFAULT_CHUNK})")
    p.add_argument("--replace", action="store_true", help="replace a stored model of that name")
    p.add_argument("--load", action="store_true", help="load the model on the server once it is published")
    p.add_argument("--quiet", action="store_true", help="print only the result")
    p.set_defaults(func=cmd_push)


def resume_file() -> Path:
    """Where upload URLs are kept between runs ($QUILL_PUSH_RESUME, else the user's cache dir)."""
    env = os.environ.get("QUILL_PUSH_RESUME")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("quill")) / "push-uploads.json"


class ResumeFile:
    """{key: upload URL}, one key per (server, model, file, content)."""

    def __init__(self, path: Path):
        self.path = path
        try:
            self.data = json.loads(path.read_text())
            if not isinstance(self.data, dict):
                self.data = {}
        except (OSError, ValueError):
            self.data = {}

    @staticmethod
    def key(url: str, name: str, filename: str, sha256: str) -> str:
        return hashlib.sha256(f"{url}\0{name}\0{filename}\0{sha256}".encode()).hexdigest()[:32]

    def get(self, key: str) -> str | None:
        value = self.data.get(key)
        return value if isinstance(value, str) else None

    def set(self, key: str, url: str | None) -> None:
        if url is None:
            self.data.pop(key, None)
        else:
            self.data[key] = url
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_json_durably(self.path, self.data)
        except OSError:
            pass  # resuming is a convenience: an unwritable cache only means starting over next time


def model_files(folder: Path) -> tuple[list[Path], list[str]]:
    """The files of `folder` the store accepts, and notes about the ones it skips."""
    if not folder.is_dir():
        raise PushError(f"{folder} is not a folder")
    files, skipped = [], []
    for p in sorted(folder.iterdir()):
        if not p.is_file():
            continue
        try:
            validate_file_name(p.name)
            files.append(p)
        except StoreError as e:
            skipped.append(str(e))
    names = {p.name for p in files}
    if not any(file_kind(n) in ("safetensors", "shard") for n in names):
        raise PushError(f"{folder} has no safetensors weights (model.safetensors or shards); pickled weights "
                        f"(.bin, .pt) are not accepted: convert them to safetensors first")
    if "config.json" not in names:
        raise PushError(f"{folder} has no config.json")
    return files, skipped


def _server_message(e: Exception) -> str:
    """The server's error message from a tuspy exception (its body is OpenAI error JSON), else the exception."""
    status = getattr(e, "status_code", None)
    body = getattr(e, "response_content", None)
    try:
        message = json.loads(body)["error"]["message"]
    except (TypeError, ValueError, KeyError):
        message = (body.decode(errors="replace").strip() if isinstance(body, bytes) and body else None) or str(e)
    message = " ".join(str(message).split())  # one line
    return f"HTTP {status}: {message}" if status else message


def _print(quiet: bool, *args) -> None:
    if not quiet:
        print(*args, file=sys.stderr, flush=True)


def upload_file(client, path: Path, name: str, sha256: str, chunk_size: int, resume: ResumeFile, url: str,
                quiet: bool = False) -> None:
    """Upload one file (resuming a stored upload URL when the server still has it)."""
    from tusclient.exceptions import TusCommunicationError, TusUploadFailed

    size = path.stat().st_size
    key = ResumeFile.key(url, name, path.name, sha256)
    metadata = {"model": name, "filename": path.name, "filetype": "application/octet-stream"}
    stored = resume.get(key)
    uploader = None
    if stored:
        try:
            uploader = client.uploader(file_path=str(path), url=stored, chunk_size=chunk_size, metadata=metadata,
                                       upload_checksum=True, retries=2, retry_delay=1)
            _print(quiet, f"{path.name}: resuming at {uploader.offset} of {size} bytes")
        except (TusCommunicationError, TusUploadFailed) as e:
            if getattr(e, "status_code", None) not in (404, 410):
                raise PushError(f"cannot resume {path.name}: {_server_message(e)}") from None
            uploader = None  # gone (committed, expired or deleted): start again
            resume.set(key, None)
    try:
        if uploader is None:
            uploader = client.uploader(file_path=str(path), chunk_size=chunk_size, metadata=metadata,
                                       upload_checksum=True, retries=2, retry_delay=1)
            uploader.set_url(uploader.create_url())
            uploader.offset = 0
            resume.set(key, uploader.url)
        while uploader.offset < size:
            uploader.upload_chunk()
            _print(quiet, f"{path.name}: {uploader.offset} of {size} bytes")
        if size == 0:
            _print(quiet, f"{path.name}: 0 bytes")
    except (TusCommunicationError, TusUploadFailed) as e:
        raise PushError(f"upload of {path.name} failed: {_server_message(e)}") from None


def push(model_dir: str | os.PathLike, name: str, url: str, admin_key: str | None, chunk_size: int | str = DEFAULT_CHUNK,
         replace: bool = False, load: bool = False, quiet: bool = False) -> dict[str, Any]:
    """Upload and commit `model_dir` as `name`; returns the server's commit answer."""
    import requests
    from tusclient.client import TusClient

    validate_model_name(name, "name")
    chunk = parse_size(chunk_size, "chunk_size")
    if chunk < 1:
        raise PushError("--chunk-size must be at least 1 byte")
    url = url.rstrip("/")
    headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
    files, skipped = model_files(Path(model_dir))
    for note in skipped:
        _print(quiet, f"skipping: {note}")
    sums = {p.name: sha256_file(p) for p in files}
    resume = ResumeFile(resume_file())
    client = TusClient(f"{url}/v1/uploads", headers=headers)
    try:
        for p in files:
            upload_file(client, p, name, sums[p.name], chunk, resume, url, quiet)
        r = requests.post(f"{url}/v1/models/{name}/commit", json={"files": sums, "replace": replace}, headers=headers,
                          timeout=600)
        answer = _json(r)
        if r.status_code != 200:
            raise PushError(f"commit of {name} failed: HTTP {r.status_code}: {_error(answer, r)}")
        for p in files:
            resume.set(ResumeFile.key(url, name, p.name, sums[p.name]), None)
        if load:
            r = requests.post(f"{url}/v1/models/{name}/load", json={}, headers=headers, timeout=600)
            if r.status_code != 200:
                raise PushError(f"{name} is published but loading it failed: HTTP {r.status_code}: "
                                f"{_error(_json(r), r)}")
            answer["loaded"] = True
    except requests.RequestException as e:
        raise PushError(" ".join(f"cannot reach {url}: {e.__class__.__name__}: {e}".split())) from None
    return answer


def _json(r) -> dict:
    try:
        value = r.json()
        return value if isinstance(value, dict) else {}
    except ValueError:
        return {}


def _error(answer: dict, r) -> str:
    try:
        return answer["error"]["message"]
    except (KeyError, TypeError):
        return r.text.strip()[:200] or r.reason


def cmd_push(args: argparse.Namespace) -> None:
    answer = push(args.model_dir, args.name, args.url, args.admin_key or os.environ.get("QUILL_ADMIN_KEY"),
                  args.chunk_size, args.replace, args.load, args.quiet)
    size = answer.get("bytes") or 0
    print(f"published {args.name}: {len(answer.get('files') or {})} files, {size:,} bytes, "
          f"{answer.get('parameters', 0):,} parameters" + (", loaded" if answer.get("loaded") else ""))
