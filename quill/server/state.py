"""What a running server holds: its configuration, the loaded models with their schedulers, and hooks.

One `AppState` lives on `app.state.quill`. Routers reach it with the `get_state` dependency. Other parts of
Quill extend the server through it without editing the server's modules:

- `add_model(name, engine)` / `remove_model(name)`: load or unload models at run time (the model store);
- `admission_checks`: callables `(ctx: GenerationContext) -> None` (sync or async) run before a generation
  is queued; raise `quill.server.errors.APIError` to refuse it (e.g. a FLOP budget);
- `usage_listeners`: callables `(ctx: GenerationContext, usage: Usage) -> None` run once a generation ended
  (finished, cancelled or failed), on the event loop: metering;
- `startup_hooks` / `shutdown_hooks`: callables (sync or async) run by the app's lifespan;
- `body_limit_exempt`: path prefixes whose request bodies may exceed `config.max_body_bytes` (uploads);
- `extend_model_list`: `(listing: dict) -> dict` applied to GET /v1/models' answer (stored models).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import Request

from platformdirs import user_data_dir

from quill.batching import Scheduler
from quill.continuation import DEFAULT_MAX_HANDLES, DEFAULT_TTL, ContinuationStore, owner_id
from quill.engine import DTYPES, Engine
from quill.errors import InvalidParameter
from quill.generate import GenerationRequest
from quill.kvpool import KVPool
from quill.prefix_cache import PrefixCache

DEFAULT_MAX_BODY_BYTES = 2 * 1024 * 1024


@dataclass
class ServerConfig:
    """Settings of one server, from `quill serve`'s flags."""

    api_keys: tuple[str, ...] = ()  # empty: /v1 is open
    admin_keys: tuple[str, ...] = ()  # empty: admin routes are disabled
    store_dir: Path | None = None  # the model store's folder (--store)
    max_batch: int = 8  # rows decoded together per model
    max_queue: int = 64  # requests waiting per model before 429
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES  # larger request bodies get 413
    max_connections: int = 500  # open connections; one more is answered 503 (quill.server.connections)
    header_timeout: float = 10.0  # seconds for a request's headers to arrive, else 408
    body_timeout: float = 30.0  # seconds a request's body may stop arriving, else 408
    keep_alive_timeout: float = 5.0  # seconds an idle keep-alive connection stays open (uvicorn's)
    dtype: str = "float32"
    device: str = "cpu"
    compile: bool = False  # torch.compile every model loaded (--compile)
    kv_cache: str | None = None  # KV cache dtype of every model loaded (--kv-cache; None: quill.load's default)
    continuation_ttl: float = DEFAULT_TTL  # seconds a budget's continuation handle stays valid
    max_handles: int = DEFAULT_MAX_HANDLES  # continuation handles kept, the least recently used dropped first
    handle_sweep_seconds: float = 60.0  # how often expired handles (and their files) are removed
    prefix_cache: int | None = None  # bytes of KV kept between calls (prefix blocks, paused calls); None: default
    prefix_cache_share: bool = False  # reuse cached prompt blocks across API keys (default: only within a key)


@dataclass
class LoadedModel:
    """A served model: its engine (model + tokenizer) and the scheduler decoding its requests."""

    name: str
    engine: Engine
    scheduler: Scheduler
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def context_length(self) -> int:
        return self.engine.config.n_positions

    @property
    def precision(self) -> str | None:
        """int8 for a quantised model, else its weights' dtype (bfloat16 for one loaded at bf16)."""
        from quill.quantize import is_quantized_model

        if is_quantized_model(self.engine.model):
            return "int8"
        p = next(self.engine.model.parameters(), None)
        return None if p is None else str(p.dtype).removeprefix("torch.")


@dataclass
class GenerationContext:
    """One generation request as the hooks see it."""

    route: str  # "completions", "chat.completions", "inference"
    model: LoadedModel
    request: GenerationRequest
    n: int
    http: Request
    principal: str | None  # who is calling: "key:<hash prefix>", "admin", or None on an open server
    api_key: str | None = None  # the caller's key itself (None on an open server)
    extra: dict[str, Any] = field(default_factory=dict)  # merged into the response body (and the last chunk)


class AppState:
    """The server's models, configuration and extension hooks (see the module docstring)."""

    def __init__(self, config: ServerConfig | None = None, metrics=None):
        from quill.server.metrics import Metrics

        self.config = config or ServerConfig()
        self.metrics = metrics or Metrics()
        self.models: dict[str, LoadedModel] = {}
        self.admission_checks: list[Callable] = []
        self.usage_listeners: list[Callable] = []
        self.startup_hooks: list[Callable] = []
        self.shutdown_hooks: list[Callable] = []
        self.body_limit_exempt: list[str] = []
        self.extend_model_list: Callable[[dict], dict] | None = None  # GET /v1/models listing -> listing
        self.model_store: Any = None  # the model store service, when mounted
        self.hub_pulls: Any = None  # downloads from the Hugging Face Hub (routes_hub), when mounted
        # Paused generations of every model, on disk beside the store so handles survive a restart.
        directory = (self.config.store_dir / ".continuations" if self.config.store_dir is not None
                     else Path(user_data_dir("quill")) / "continuations")
        # One pool, one bound: the prefix caches of every model and the paused generations' KV caches. With
        # prefix caching off (--prefix-cache 0) the pool keeps paused generations' caches within the default.
        self.kv_pool = KVPool(self.config.prefix_cache or None)
        self.continuations = ContinuationStore(directory, ttl=self.config.continuation_ttl,
                                               max_handles=self.config.max_handles, pool=self.kv_pool)
        self.metrics.watch_kv(self)
        self.started = False

    @property
    def default_model(self) -> str | None:
        """The model used when a request names none: the first one loaded."""
        return next(iter(self.models), None)

    def add_model(self, name: str, engine: Engine) -> LoadedModel:
        """Serve `engine` as `name` (replacing a model of that name); its scheduler starts with the server."""
        if name in self.models:
            self.remove_model(name)
        engine.continuations = self.continuations
        engine.prefix_cache = PrefixCache(self.kv_pool) if self.config.prefix_cache != 0 else None
        scheduler = Scheduler(engine, self.config.max_batch, self.config.max_queue,
                              observer=self.metrics.observer(name, self.config.max_batch), name=name)
        loaded = LoadedModel(name, engine, scheduler)
        self.models[name] = loaded
        if self.started:
            scheduler.start()
        return loaded

    def load_options(self, dtype: str | None) -> dict[str, Any]:
        """The `quill.load` keywords of a model loaded at run time at `dtype` (float32, bfloat16, float16 or
        int8; default the server's --dtype), with the server's device, compile and KV cache settings; a bad
        dtype is an InvalidParameter naming `dtype`."""
        kw: dict[str, Any] = {"device": self.config.device, "compile": self.config.compile,
                              "kv_cache": self.config.kv_cache}
        dtype = dtype or self.config.dtype
        if isinstance(dtype, str) and dtype.lower() == "int8":
            return {**kw, "dtype": "float32", "quantize": "int8"}
        if not (isinstance(dtype, str) and dtype.lower() in DTYPES):
            raise InvalidParameter(f"dtype must be one of float32, bfloat16, float16, int8, got {dtype!r}", "dtype")
        return {**kw, "dtype": DTYPES[dtype.lower()]}

    def remove_model(self, name: str) -> LoadedModel | None:
        """Stop serving `name`: its waiting and running requests end with an error."""
        loaded = self.models.pop(name, None)
        if loaded is not None:
            loaded.scheduler.stop()
            if loaded.engine.prefix_cache is not None:
                loaded.engine.prefix_cache.clear()
            self.metrics.forget_model(name)
        return loaded

    def cache_salt(self, api_key: str | None) -> str:
        """The prefix-cache salt of a caller: its key's hash (tenants do not see each other's hits in timing),
        or one salt for all with --prefix-cache-share."""
        return "" if self.config.prefix_cache_share else owner_id(api_key)

    def start(self) -> None:
        self.started = True
        for m in self.models.values():
            m.scheduler.start()

    def stop(self) -> None:
        self.started = False
        for m in self.models.values():
            m.scheduler.stop()


def get_state(request: Request) -> AppState:
    """FastAPI dependency: the AppState of the app serving this request."""
    return request.app.state.quill
