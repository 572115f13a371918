"""Models from the Hugging Face Hub on a running server (admin key required; see docs/models.md).

- `POST /v1/models/pull` {"name": "gpt2" | "org/name[@revision]", "dtype": ..., "load": true}: checks the repo
  at once (an unknown, gated or non-GPT-2 repo is answered there, naming `name`), then downloads it into the
  Hugging Face cache in the background and loads it at the precision asked (as a stored model loads). 202 with
  the pull's status; a pull of a model already being pulled answers that pull.
- `GET /v1/hub/models`: the GPT-2 family the web page offers (sizes, cached, loaded) and every pull's progress
  (`status`: downloading, loading, ready or failed; `bytes_done` of `bytes_total`; `error` when failed).
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from fastapi import APIRouter, Depends
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from quill import hub
from quill.errors import HubAccessDenied, HubDiskFull, HubError, HubModelNotFound, HubUnreachable, QuillError
from quill.server.auth import require_admin
from quill.server.errors import APIError, from_exception
from quill.server.schemas import error_responses
from quill.server.state import AppState, get_state

# The HTTP status of each HubError (NotGPT2Checkpoint and any other: 400).
HUB_STATUS = {HubModelNotFound: (404, "model_not_found"), HubAccessDenied: (403, "hub_access_denied"),
              HubUnreachable: (502, "hub_unreachable"), HubDiskFull: (507, "insufficient_storage")}


def api_error(e: QuillError) -> APIError:
    """A HubError (or another QuillError of a pull) as the HTTP error naming the field `name`."""
    if not isinstance(e, HubError):
        return from_exception(e)
    status, code = next((v for cls, v in HUB_STATUS.items() if isinstance(e, cls)), (400, "not_a_gpt2_checkpoint"))
    return APIError(status, str(e), param="name", code=code)


class PullRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    dtype: str | None = None  # fp32/float32, bf16/bfloat16, fp16/float16, int8; default: the server's --dtype
    load: bool = True


@dataclass
class Pull:
    """One download (and load) of a Hub model, as GET /v1/hub/models reports it."""

    id: str  # the name asked for, and the id the model is served as
    repo: str
    status: str = "downloading"
    bytes_done: int = 0
    bytes_total: int = 0
    precision: str | None = None
    error: dict[str, Any] | None = None
    started: float = field(default_factory=time.time)


def progress_bar(pull: Pull):
    """A tqdm class for hub.download's per-file bars that counts their bytes into `pull` (and draws nothing)."""
    from huggingface_hub.utils import tqdm as hf_tqdm

    lock = threading.Lock()  # bars of several files may update at once

    class Bar(hf_tqdm):
        def __init__(self, *args, name: str | None = None, initial: float = 0, **kwargs):
            self._counts = name == "huggingface_hub.http_get"  # one file's bytes; `initial`: a resumed part
            kwargs["disable"] = True
            super().__init__(*args, name=name, initial=initial, **kwargs)
            self.update_pull(initial)

        def update_pull(self, n: float | None) -> None:
            if self._counts:  # a restarted file counts back down (a negative n)
                with lock:
                    pull.bytes_done = max(0, min(pull.bytes_total, pull.bytes_done + int(n or 0)))

        def update(self, n: float | None = 1):
            self.update_pull(n)
            return super().update(n)

    return Bar


class HubService:
    """The pulls of a server: started by POST /v1/models/pull, each an asyncio task on the server's loop."""

    def __init__(self, state: AppState):
        self.state = state
        self.pulls: dict[str, Pull] = {}
        self._tasks: set[asyncio.Task] = set()

    async def start(self, body: PullRequest) -> Pull:
        name = hub.parse(body.name)
        if name is None:
            raise APIError(400, f"{body.name!r} is not a Hugging Face repo id (org/name[@revision]) or a GPT-2 alias "
                                f"({', '.join(hub.ALIASES)})", param="name", code="invalid_value")
        current = self.pulls.get(body.name)
        if current is not None and current.status in ("downloading", "loading"):
            return current
        kw = self.state.load_options(body.dtype)  # a bad dtype is refused before anything is fetched
        pull = Pull(body.name, str(name))
        folder = await run_in_threadpool(hub.cached, name)
        plan = None
        if folder is not None:  # in the cache: nothing to download
            pull.bytes_total = pull.bytes_done = hub.snapshot_bytes(folder)
        else:
            try:
                plan = await run_in_threadpool(hub.plan, name)
            except QuillError as e:
                raise api_error(e) from None
            pull.bytes_total = plan.total_bytes
        self.pulls[body.name] = pull
        task = asyncio.create_task(self._run(pull, plan, folder, kw if body.load else None))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return pull

    async def _run(self, pull: Pull, plan, folder, load_kw: dict | None) -> None:
        import quill

        try:
            if folder is None:
                folder = await run_in_threadpool(hub.download, plan, progress_bar(pull))
            pull.bytes_done = pull.bytes_total
            if load_kw is not None:
                pull.status = "loading"
                engine = await run_in_threadpool(lambda: quill.load(folder, **load_kw))
                engine.name = pull.id
                pull.precision = self.state.add_model(pull.id, engine).precision
            pull.status = "ready"
        except Exception as e:  # the pull's outcome is its status: a failure is reported, not raised into the loop
            err = api_error(e) if isinstance(e, QuillError) else from_exception(e)
            pull.status, pull.error = "failed", {**err.body()["error"], "status": err.status}

    def family(self) -> list[dict[str, Any]]:
        """The GPT-2 family with sizes, whether the cache holds each and whether it is loaded."""
        return [{"id": alias, "repo": repo, "parameters": hub.FAMILY_PARAMETERS[alias],
                 "cached": hub.cached(hub.HubName(repo)) is not None, "loaded": alias in self.state.models}
                for alias, repo in hub.ALIASES.items()]


def get_service(state: AppState = Depends(get_state)) -> HubService:
    return state.hub_pulls


router = APIRouter(prefix="/v1", dependencies=[Depends(require_admin)], tags=["hub"],
                   responses=error_responses(400, 401, 403, 413, 503))


@router.post("/models/pull", status_code=202, responses=error_responses(404, 502, 507))
async def pull_model(body: PullRequest, service: HubService = Depends(get_service)):
    """Check a Hub model, then download and load it in the background; poll GET /v1/hub/models."""
    pull = await service.start(body)
    return JSONResponse({"object": "model.pull", **asdict(pull)}, status_code=202)


@router.get("/hub/models")
async def hub_models(service: HubService = Depends(get_service)):
    """The family on offer and the progress of every pull."""
    family = await run_in_threadpool(service.family)
    return {"object": "list", "data": family, "pulls": [asdict(p) for p in service.pulls.values()]}


def mount(app, state: AppState) -> None:
    state.hub_pulls = HubService(state)
