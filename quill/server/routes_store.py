"""The model store over HTTP: resumable tus 1.0 uploads and the model admin routes (see docs/store.md).

- `/v1/uploads`: tus 1.0 (core, creation, expiration, termination, checksum) served by `tuspyserver` with a
  crash-safe storage backend; admin key required. Upload-Metadata names the model (`model`) and the file
  (`filename`). `GET /v1/uploads[?model=NAME]` lists uploads in progress or complete.
- `POST /v1/models/{name}/commit` {"files": {FILE: SHA256}, "replace": false}: verify, check, publish atomically.
- `POST /v1/models/{name}/load` {"dtype": "fp32"|"bf16"|"int8"}, `POST /v1/models/{name}/unload`,
  `DELETE /v1/models/{name}`: admin key required.
- `GET /v1/models` (routes_openai) lists stored models too, through `state.extend_model_list`.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import contextvars
import errno
import hashlib
import logging
import os
import re
from typing import Any

import fastapi
from fastapi import APIRouter, Depends, FastAPI, Request, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field
from tuspyserver import create_tus_router
from tuspyserver.storage.local import LocalFileStorage

from quill.atomic import write_json_durably
from quill.server.auth import require_admin
from quill.server.errors import APIError
from quill.server.schemas import error_responses
from quill.server.state import AppState, get_state
from quill.store import Store, StoreError, default_store_dir, limits_from_env, upload_metadata, validate_model_name

log = logging.getLogger("quill.store")

UPLOAD_PREFIX = "/v1/uploads"
UPLOAD_ID = re.compile(r"[0-9a-f]{32}")  # what tuspyserver names an upload (uuid4().hex)
UPLOAD_LENGTH = re.compile(r"[0-9]{1,20}")
TUS_VERSION = "1.0.0"
TUS_EXTENSIONS = "creation,expiration,termination,checksum"
CHECKSUMS = {"sha1": hashlib.sha1, "sha256": hashlib.sha256, "sha512": hashlib.sha512, "md5": hashlib.md5}
UPLOAD_DAYS = 7  # an upload not completed (and committed) within this many days is dropped


class StoreHTTPError(APIError, fastapi.HTTPException):
    """An APIError that tuspyserver's code paths let through untouched (they re-raise fastapi's HTTPException)."""


# The HTTP status of each StoreError code that is not a plain 400 (quill/store.py knows nothing of HTTP).
STORE_STATUS = {"model_not_found": 404, "model_exists": 409, "file_too_large": 413, "model_too_large": 413,
                "store_error": 500, "insufficient_storage": 507}


def api_error(e: StoreError) -> StoreHTTPError:
    return StoreHTTPError(STORE_STATUS.get(e.code, 400), str(e), param=e.param, code=e.code)


def _os_error(e: OSError, what: str, param: str | None = None) -> StoreHTTPError:
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return StoreHTTPError(507, f"the store's disk is full while {what}; the upload keeps its last acknowledged "
                                   f"offset", param=param, code="insufficient_storage")
    return StoreHTTPError(500, f"storage error while {what}: {e.strerror or e}", param=param, code="store_error")


# The Upload-Checksum of the PATCH being handled: set by `upload_guard` (a router dependency, so it runs before
# tuspyserver's body handler in the same task) and checked by the storage when the body has been written.
_CHECKSUM: contextvars.ContextVar[tuple[str, bytes] | None] = contextvars.ContextVar("quill_upload_checksum",
                                                                                     default=None)


class _Patch:
    """What one PATCH has written so far (under the upload's lock)."""

    def __init__(self, start: int, checksum: tuple[str, bytes] | None):
        self.start = self.pos = start
        self.checksum = checksum
        self.hasher = CHECKSUMS[checksum[0]]() if checksum else None


def _write_at(path: str, pos: int, chunk: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(pos)
        f.write(chunk)


def _truncate(path: str, size: int) -> None:
    with open(path, "r+b") as f:
        if os.fstat(f.fileno()).st_size != size:
            f.truncate(size)


class DurableUploadStorage(LocalFileStorage):
    """tuspyserver's local backend (`<dir>/<uid>` + `<uid>.info`), made crash-safe and streaming.

    - Bytes are written as they arrive (not buffered in memory), at the offset the sidecar acknowledges: the
      first write of each PATCH cuts whatever an interrupted PATCH (or a `kill -9`) left past that offset.
    - The data file is fsynced before the sidecar that advertises its new offset is written (atomically, with
      fsync of file and folder), so HEAD never reports bytes that are not on disk.
    - An Upload-Checksum that does not match the PATCH body answers 460 and the offset does not advance.
    - A full disk (ENOSPC) answers 507 and leaves the upload at its last acknowledged offset.
    """

    def __init__(self, store: Store):
        super().__init__(str(store.uploads_dir))
        self.store = store
        self._patches: dict[str, _Patch] = {}

    async def create(self, uid: str) -> None:
        try:
            await super().create(uid)
        except OSError as e:
            raise _os_error(e, "creating an upload") from None

    async def append(self, uid: str, chunk: bytes) -> None:
        path = self._path(uid)
        patch = self._patches.get(uid)
        try:
            if patch is None:
                info = await self.read_info(uid) or {}
                patch = self._patches[uid] = _Patch(int(info.get("offset") or 0), _CHECKSUM.get())
                await asyncio.to_thread(_truncate, path, patch.start)
            await asyncio.to_thread(_write_at, path, patch.pos, chunk)
        except OSError as e:
            self._patches.pop(uid, None)
            raise _os_error(e, "writing an upload") from None
        patch.pos += len(chunk)
        if patch.hasher is not None:
            patch.hasher.update(chunk)

    async def flush(self, uid: str) -> None:
        patch = self._patches.pop(uid, None)
        if patch is None:
            return
        if patch.checksum is not None and patch.hasher.digest() != patch.checksum[1]:
            raise StoreHTTPError(460, f"Upload-Checksum mismatch: the {patch.pos - patch.start} bytes received do not "
                                      f"have the {patch.checksum[0]} checksum given; send them again",
                                 code="checksum_mismatch")
        try:
            await asyncio.to_thread(self._fsync, uid)
        except OSError as e:
            raise _os_error(e, "writing an upload") from None

    def _fsync(self, uid: str) -> None:
        with open(self._path(uid), "rb") as f:
            os.fsync(f.fileno())

    async def write_info(self, uid: str, data: dict) -> None:
        meta = data.get("metadata")
        if isinstance(meta, dict):  # tuspyserver's HEAD wants a filename and a filetype
            model, filename = upload_metadata(meta)
            if filename and "filename" not in meta:
                meta["filename"] = filename
            meta.setdefault("filetype", "application/octet-stream")

        def _do() -> None:
            if os.path.exists(self._path(uid)):
                self._fsync(uid)  # the data first: the sidecar never claims bytes that are not on disk
            write_json_durably(self._info_path(uid), data)

        try:
            await asyncio.to_thread(_do)
        except OSError as e:
            raise _os_error(e, "recording an upload's offset") from None

    @contextlib.asynccontextmanager
    async def lock(self, uid: str):
        async with super().lock(uid):
            self._patches.pop(uid, None)
            try:
                yield
            finally:
                self._patches.pop(uid, None)

    async def delete(self, uid: str) -> None:
        self._patches.pop(uid, None)
        await super().delete(uid)


# ---- the service on AppState ---------------------------------------------------------------------------------------


class StoreService:
    """The store as the server sees it: the Store, and which stored models are loaded at which precision."""

    def __init__(self, store: Store, state: AppState):
        self.store, self.state = store, state

    def startup(self, state: AppState) -> None:
        explicit = state.config.store_dir is not None
        if not explicit and not self.store.root.is_dir():
            return  # the default store is created by the first upload
        self.store.ensure()
        if not self.store.acquire():
            log.warning("another process holds the store %s: skipping crash recovery", self.store.root)
            return
        for line in self.store.recover():
            log.warning("store %s: %s", self.store.root, line)

    def shutdown(self, state: AppState) -> None:
        self.store.release()

    def loaded_precision(self, name: str) -> str | None:
        m = self.state.models.get(name)
        return None if m is None else m.precision

    def extend_model_list(self, listing: dict[str, Any]) -> dict[str, Any]:
        """GET /v1/models: loaded models get their store fields, stored models that are not loaded are added."""
        stored = {m["name"]: m for m in self.store.list()}
        for card in listing["data"]:
            m = stored.pop(card["id"], None)
            card.update(self._fields(card["id"], m))
        for name, m in stored.items():
            card = {"id": name, "object": "model", "created": m.get("created", 0), "owned_by": "quill",
                    "context_length": m.get("context_length"), "vocab_size": m.get("vocab_size"),
                    "parameters": m.get("parameters"), "has_chat_template": m.get("has_chat_template", False)}
            card.update(self._fields(name, m))
            listing["data"].append(card)
        return listing

    def _fields(self, name: str, m: dict | None) -> dict[str, Any]:
        return {"stored": m is not None, "loaded": name in self.state.models,
                "bytes": m.get("bytes") if m else None, "dtype": m.get("dtype") if m else None,
                "precision": self.loaded_precision(name),
                "files": {f: v.get("bytes") for f, v in m.get("files", {}).items()} if m else None}


def get_service(state: AppState = Depends(get_state)) -> StoreService:
    service = state.model_store
    if service is None:
        raise APIError(503, "the model store is not enabled on this server", code="store_disabled")
    return service


# ---- tus: guard, options, listing ------------------------------------------------------------------------------


async def upload_guard(request: Request, _: str = Depends(require_admin),
                       service: StoreService = Depends(get_service)) -> None:
    """Admin key first (before tuspyserver reads a byte), then the protocol features the store refuses, then
    the Upload-Checksum of a PATCH."""
    _CHECKSUM.set(None)
    h = request.headers
    uid = request.path_params.get("uuid")
    if uid is not None and not UPLOAD_ID.fullmatch(uid):  # e.g. "<id>.info", the sidecar of an upload
        raise APIError(404, f"no upload {uid!r}", code="not_found")
    if request.method == "POST":
        if h.get("upload-concat") is not None:
            raise APIError(400, "the concatenation extension is not supported: upload each file whole", code="invalid_value")
        if h.get("upload-defer-length") is not None:
            raise APIError(400, "deferred lengths are not supported: send Upload-Length", code="invalid_value")
        if not UPLOAD_LENGTH.fullmatch(h.get("upload-length", "")):
            raise APIError(400, "Upload-Length must be the file's size in bytes (a non-negative integer)",
                           param="Upload-Length", code="invalid_value")
        if (h.get("content-length") not in (None, "0")) or h.get("transfer-encoding"):
            raise APIError(400, "creation-with-upload is not supported: create the upload, then PATCH its data",
                           code="invalid_value")
    if request.method == "PATCH" and h.get("upload-checksum"):
        algorithm, _, value = h["upload-checksum"].strip().partition(" ")
        if algorithm.lower() not in CHECKSUMS:
            raise APIError(400, f"unsupported Upload-Checksum algorithm {algorithm!r} (supported: "
                                f"{', '.join(CHECKSUMS)})", code="invalid_value")
        try:
            digest = base64.b64decode(value.strip(), validate=True)
        except (binascii.Error, ValueError):
            raise APIError(400, "Upload-Checksum is not '<algorithm> <base64 digest>'", code="invalid_value") from None
        _CHECKSUM.set((algorithm.lower(), digest))


def _tus_headers(service: StoreService) -> dict[str, str]:
    return {"Tus-Resumable": TUS_VERSION, "Tus-Version": TUS_VERSION, "Tus-Extension": TUS_EXTENSIONS,
            "Tus-Max-Size": str(service.store.max_file_bytes), "Tus-Checksum-Algorithm": ",".join(CHECKSUMS)}


uploads = APIRouter(prefix=UPLOAD_PREFIX, dependencies=[Depends(require_admin)], tags=["store"],
                    responses=error_responses(401, 403, 503))


@uploads.options("", status_code=204, response_class=Response)
@uploads.options("/", status_code=204, response_class=Response)
async def tus_options(service: StoreService = Depends(get_service)) -> Response:
    """tus discovery: versions, extensions (checksum included), the largest file."""
    return Response(status_code=204, headers=_tus_headers(service))


@uploads.get("", responses=error_responses(400))
async def list_uploads(model: str | None = None, service: StoreService = Depends(get_service)) -> dict[str, Any]:
    """Uploads in progress or complete (not yet committed), optionally only those of one model."""
    found = await run_in_threadpool(service.store.uploads, model)
    return {"object": "list", "data": [u.as_dict() for u in found]}


def tus_router(service: StoreService) -> APIRouter:
    store = service.store

    def pre_create(metadata: dict, info: dict) -> None:
        model, filename = upload_metadata(metadata)
        try:
            store.check_upload(model, filename, info.get("size"))
        except StoreError as e:
            raise api_error(e) from None

    def on_complete(path: str, metadata: dict) -> None:
        store.supersede(os.path.basename(path))

    # (tuspyserver deep-copies its options per request: hooks are plain functions, the storage copies as itself)
    return create_tus_router(prefix=UPLOAD_PREFIX, files_dir=str(store.uploads_dir), max_size=store.max_file_bytes,
                             days_to_keep=UPLOAD_DAYS, pre_create_hook=pre_create, on_upload_complete=on_complete,
                             tags=["store"],
                             storage=DurableUploadStorage(store))


# ---- model admin routes --------------------------------------------------------------------------------------------


class CommitRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    files: dict[str, str] = Field(..., description="file name -> expected SHA-256 (hex)")
    replace: bool = False


class LoadRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    dtype: str | None = None  # fp32/float32, bf16/bfloat16, fp16/float16, int8; default: the server's --dtype


router = APIRouter(prefix="/v1/models", dependencies=[Depends(require_admin)], tags=["store"],
                   responses=error_responses(400, 401, 403, 404, 503))


def _stored(service: StoreService, name: str) -> dict[str, Any]:
    try:
        validate_model_name(name, "name")
    except StoreError as e:
        raise api_error(e) from None
    m = service.store.get(name)
    if m is None:
        raise APIError(404, f"no stored model named {name!r}", param="name", code="model_not_found")
    return m


@router.post("/{name}/commit", responses=error_responses(409, 413, 507))
async def commit_model(name: str, body: CommitRequest, service: StoreService = Depends(get_service)):
    """Verify every file's SHA-256, check the files as a model, publish atomically."""
    try:
        manifest = await run_in_threadpool(service.store.commit, name, body.files, body.replace)
    except StoreError as e:
        raise api_error(e) from None
    return {"object": "model", "id": name, "committed": True, **service._fields(name, manifest),
            "parameters": manifest["parameters"], "context_length": manifest["context_length"]}


@router.post("/{name}/load", responses=error_responses(413))
async def load_model(name: str, body: LoadRequest | None = None, state: AppState = Depends(get_state),
                     service: StoreService = Depends(get_service)):
    """Load a stored model (replacing a loaded model of that name) at fp32, bf16 or int8."""
    import quill

    _stored(service, name)
    kw = state.load_options(body.dtype if body else None)
    engine = await run_in_threadpool(lambda: quill.load(service.store.path(name), **kw))
    engine.name = name
    state.add_model(name, engine)
    return {"object": "model", "id": name, "loaded": True, "precision": service.loaded_precision(name)}


@router.post("/{name}/unload")
async def unload_model(name: str, state: AppState = Depends(get_state), service: StoreService = Depends(get_service)):
    """Stop serving a model (its waiting and running requests end with an error); the store keeps it."""
    if state.remove_model(name) is None:
        raise APIError(404, f"the model {name!r} is not loaded", param="name", code="model_not_found")
    return {"object": "model", "id": name, "loaded": False}


@router.delete("/{name}", responses=error_responses(409))
async def delete_model(name: str, state: AppState = Depends(get_state), service: StoreService = Depends(get_service)):
    """Unload (if loaded) and delete a stored model and its pending uploads."""
    _stored(service, name)
    state.remove_model(name)
    try:
        await run_in_threadpool(service.store.delete, name)
    except StoreError as e:
        raise api_error(e) from None
    return {"object": "model", "id": name, "deleted": True}


def mount(app: FastAPI, state: AppState) -> None:
    """Attach the store at `state.config.store_dir` (default: the user's data dir) to the app."""
    store = Store(state.config.store_dir or default_store_dir(), **limits_from_env())
    service = StoreService(store, state)
    state.model_store = service
    state.extend_model_list = service.extend_model_list
    state.startup_hooks.append(service.startup)
    state.shutdown_hooks.append(service.shutdown)
    state.body_limit_exempt.append(UPLOAD_PREFIX + "/")
    app.include_router(uploads)  # before tuspyserver's: our OPTIONS advertises what we really support
    app.include_router(tus_router(service), dependencies=[Depends(upload_guard)],
                       responses=error_responses(400, 401, 403, 404, 409, 410, 412, 413, 460, 503, 507))
