"""`quill push MODEL_DIR NAME`: upload a checkpoint folder to a server's model store and publish it.

Each file goes up with tus (the `tuspy` client) in chunks, each chunk with an Upload-Checksum, under a progress
bar. While the server is unreachable or answers 5xx (a restart), every step is retried with backoff for up to
--retry-for seconds, and the file continues from the offset the server reports (tus HEAD). The upload URLs are
kept in a small resume file under the user's cache dir, so running the same command again after an interruption
that outlasted that (or Ctrl-C) continues too.
Then the files are committed with their SHA-256s: the server verifies and checks them and publishes the model.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from quill.errors import QuillError
from quill.atomic import write_json_durably
from quill.store import StoreError, file_kind, parse_size, sha256_file, validate_file_name, validate_model_name

DEFAULT_CHUNK = "2MB"
DEFAULT_RETRY_FOR = 300.0  # seconds one outage may last (a server restart, a network blip) before push gives up
MAX_DELAY = 5.0  # the longest wait between tries: a server that is back is found within seconds
TRANSIENT_STATUS = {500, 502, 503, 504}


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
    p.add_argument("--retry-for", type=float, default=DEFAULT_RETRY_FOR, metavar="SECONDS",
                   help=f"keep retrying (with backoff) while the server is unreachable or answers 5xx, for up to "
                        f"this long per outage (default {DEFAULT_RETRY_FOR:g})")
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
        from tqdm import tqdm

        tqdm.write(" ".join(map(str, args)), file=sys.stderr)  # above the progress bars, not through them


class _ServerError(Exception):
    """A 5xx answer to a plain request (commit, load): the server may be restarting."""

    def __init__(self, response):
        super().__init__(f"HTTP {response.status_code}")
        self.status_code = response.status_code


def _transient(e: Exception) -> bool:
    """Worth trying again: the server is unreachable, timed out or answered 500/502/503/504 (a restart); not a
    4xx (a refusal) nor 507 (a full disk, which waiting does not cure)."""
    import requests

    status = getattr(e, "status_code", None)
    if status is not None:
        return status in TRANSIENT_STATUS
    if isinstance(e, (requests.ConnectionError, requests.Timeout, _ServerError)):
        return True
    from tusclient.exceptions import TusCommunicationError, TusUploadFailed

    return isinstance(e, (TusCommunicationError, TusUploadFailed))  # no status: the request itself failed


def _describe(e: Exception) -> str:
    return " ".join(_server_message(e).split())[:200]


class Retrier:
    """Runs a step again with exponential backoff (0.5 s doubling, at most MAX_DELAY) while the server is away,
    for up to `seconds` from the first failure of one outage; any success starts the count again."""

    def __init__(self, seconds: float, url: str, quiet: bool):
        self.seconds, self.url, self.quiet = seconds, url, quiet

    def run(self, what: str, step):
        delay, since = 0.5, None
        while True:
            try:
                return step()
            except Exception as e:  # sorted below: only transient failures are retried
                if not _transient(e):
                    raise
                now = time.monotonic()
                since = now if since is None else since
                if now - since + delay > self.seconds:
                    raise PushError(f"{what} failed: {self.url} did not answer within {self.seconds:g} s "
                                    f"(--retry-for): {_describe(e)}") from None
                if delay == 0.5:
                    _print(self.quiet, f"{what}: {_describe(e)}; retrying for up to {self.seconds:g} s")
                time.sleep(delay)
                delay = min(delay * 2, MAX_DELAY)


def upload_file(client, path: Path, name: str, sha256: str, chunk_size: int, resume: ResumeFile, url: str,
                retry: Retrier, quiet: bool = False) -> None:
    """Upload one file with a progress bar, resuming a stored upload URL when the server still has it and
    continuing from the server's offset (tus HEAD) after each failure."""
    from tqdm import tqdm
    from tusclient.exceptions import TusCommunicationError, TusUploadFailed

    size = path.stat().st_size
    key = ResumeFile.key(url, name, path.name, sha256)
    metadata = {"model": name, "filename": path.name, "filetype": "application/octet-stream"}
    options = dict(file_path=str(path), chunk_size=chunk_size, metadata=metadata, upload_checksum=True, retries=0)

    def open_upload():
        stored = resume.get(key)
        if stored:
            try:
                return client.uploader(url=stored, **options)  # HEAD: the server's offset
            except (TusCommunicationError, TusUploadFailed) as e:
                if getattr(e, "status_code", None) not in (404, 410):
                    raise
                resume.set(key, None)  # gone (committed, expired or deleted): start again
        uploader = client.uploader(**options)
        uploader.set_url(uploader.create_url())
        uploader.offset = 0
        resume.set(key, uploader.url)
        return uploader

    resync = [False]  # after a failed chunk, ask the server where the upload stands before sending more
    try:
        uploader = retry.run(f"upload of {path.name}", open_upload)
        with tqdm(total=size, initial=uploader.offset, desc=path.name, unit="B", unit_scale=True, unit_divisor=1024,
                  disable=quiet, file=sys.stderr, dynamic_ncols=True) as bar:
            while uploader.offset < size:
                retry.run(f"upload of {path.name}", lambda: _next_chunk(uploader, resync, path.name, size, quiet))
                bar.update(uploader.offset - bar.n)
    except (TusCommunicationError, TusUploadFailed) as e:
        raise PushError(f"upload of {path.name} failed: {_server_message(e)}") from None


def _next_chunk(uploader, resync: list[bool], filename: str, size: int, quiet: bool) -> None:
    """Send one chunk; after a failure, first continue from the offset the server reports (tus HEAD)."""
    if resync[0]:
        uploader.offset = uploader.get_offset()
        resync[0] = False
        _print(quiet, f"{filename}: the server has {uploader.offset} of {size} bytes; continuing")
    try:
        uploader.upload_chunk()
    except Exception:
        resync[0] = True
        raise


def push(model_dir: str | os.PathLike, name: str, url: str, admin_key: str | None, chunk_size: int | str = DEFAULT_CHUNK,
         replace: bool = False, load: bool = False, quiet: bool = False,
         retry_for: float = DEFAULT_RETRY_FOR) -> dict[str, Any]:
    """Upload and commit `model_dir` as `name`, riding out server restarts for up to `retry_for` seconds each;
    returns the server's commit answer."""
    import requests
    from tusclient.client import TusClient

    validate_model_name(name, "name")
    chunk = parse_size(chunk_size, "chunk_size")
    if chunk < 1:
        raise PushError("--chunk-size must be at least 1 byte")
    if retry_for < 0:
        raise PushError("--retry-for must be at least 0 seconds")
    url = url.rstrip("/")
    headers = {"Authorization": f"Bearer {admin_key}"} if admin_key else {}
    files, skipped = model_files(Path(model_dir))
    for note in skipped:
        _print(quiet, f"skipping: {note}")
    sums = {p.name: sha256_file(p) for p in files}
    resume = ResumeFile(resume_file())
    client = TusClient(f"{url}/v1/uploads", headers=headers)
    retry = Retrier(retry_for, url, quiet)

    def post(path: str, body: dict):
        r = requests.post(f"{url}{path}", json=body, headers=headers, timeout=600)
        if r.status_code in TRANSIENT_STATUS:
            raise _ServerError(r)
        return r

    try:
        for p in files:
            upload_file(client, p, name, sums[p.name], chunk, resume, url, retry, quiet)
        r = retry.run(f"commit of {name}", lambda: post(f"/v1/models/{name}/commit",
                                                         {"files": sums, "replace": replace}))
        answer = _json(r)
        if r.status_code != 200:
            raise PushError(f"commit of {name} failed: HTTP {r.status_code}: {_error(answer, r)}")
        for p in files:
            resume.set(ResumeFile.key(url, name, p.name, sums[p.name]), None)
        if load:
            r = retry.run(f"loading {name}", lambda: post(f"/v1/models/{name}/load", {}))
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
                  args.chunk_size, args.replace, args.load, args.quiet, args.retry_for)
    size = answer.get("bytes") or 0
    print(f"published {args.name}: {len(answer.get('files') or {})} files, {size:,} bytes, "
          f"{answer.get('parameters', 0):,} parameters" + (", loaded" if answer.get("loaded") else ""))
