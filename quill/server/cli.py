"""`quill serve`: load models and serve them over HTTP (FastAPI + uvicorn)."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

DEFAULT_MODEL = "shakespeare"


def register(subparsers) -> None:
    from quill.cli_flags import add_load_flags

    p = subparsers.add_parser("serve", help="serve models over an OpenAI-compatible HTTP API",
                              description="Serve models over an OpenAI-compatible HTTP API with continuous batching. "
                                          "MODEL is a checkpoint folder, a bundled or stored model's name or a "
                                          "Hugging Face repo (org/name, gpt2, ...), optionally "
                                          "NAME=MODEL to choose the id clients use (default: the folder's name).")
    p.add_argument("models", nargs="*", metavar="MODEL", help=f"models to serve (default: {DEFAULT_MODEL})")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    keys = p.add_mutually_exclusive_group()
    keys.add_argument("--api-key", action="append", default=None, metavar="KEY",
                      help="require 'Authorization: Bearer KEY' on /v1 (repeatable)")
    keys.add_argument("--api-key-file", metavar="FILE", help="file of API keys, one per line")
    p.add_argument("--admin-key", action="append", default=None, metavar="KEY",
                   help="key for admin routes (without one they are disabled)")
    p.add_argument("--store", metavar="DIR", default=None, help="model store folder")
    p.add_argument("--load", action="append", default=None, metavar="NAME",
                   help="serve a model of the store (--store, or the default store) from the start (repeatable)")
    p.add_argument("--max-batch", type=int, default=8, help="sequences decoded together per model (default 8)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting per model before 429 (default 64)")
    p.add_argument("--max-body-bytes", type=int, default=None, help="largest request body (default 2 MiB)")
    p.add_argument("--continuation-ttl", type=float, default=None, metavar="SECONDS",
                   help="how long a budget's continuation handle stays valid (default one hour)")
    p.add_argument("--max-connections", type=int, default=500, metavar="N",
                   help="open connections; one more is answered 503 (default 500)")
    p.add_argument("--header-timeout", type=float, default=10.0, metavar="SECONDS",
                   help="time for a request's headers to arrive, else 408 (default 10)")
    p.add_argument("--body-timeout", type=float, default=30.0, metavar="SECONDS",
                   help="time a request's body may stop arriving, else 408 (default 30)")
    p.add_argument("--keep-alive-timeout", type=float, default=5.0, metavar="SECONDS",
                   help="time an idle keep-alive connection stays open (default 5)")
    p.add_argument("--max-handles", type=int, default=None, metavar="N",
                   help="continuation handles kept, the least recently used dropped first (default 10000)")
    p.add_argument("--prefix-cache", default=None, metavar="SIZE",
                   help="memory for KV kept between calls: cached prompt blocks that later requests reuse, and paused "
                        "budgeted calls (bytes or a size like 2GiB; default an eighth of RAM, 512 MiB to 4 GiB; "
                        "0 turns prefix caching off)")
    p.add_argument("--prefix-cache-share", action="store_true",
                   help="reuse cached prompt blocks across API keys (default: only between requests of one key, "
                        "since a hit shows in timing)")
    add_load_flags(p, "models")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.set_defaults(func=cmd_serve)


def split_model_arg(arg: str) -> tuple[str | None, str]:
    """'name=path' -> (name, path); a plain path or name -> (None, it)."""
    name, sep, path = arg.partition("=")
    if sep and name and os.sep not in name and not Path(arg).exists():
        return name, path
    return None, arg


def build_state(args: argparse.Namespace):
    """Load the models named on the command line into an AppState (errors are QuillErrors, exit 2)."""
    import quill
    from quill.errors import InvalidParameter, QuillError
    from quill.resolve import bundled_models
    from quill.server.auth import read_key_file
    from quill.server.state import DEFAULT_MAX_BODY_BYTES, AppState, ServerConfig

    for flag in ("max_batch", "port"):
        if getattr(args, flag) < 1:
            raise InvalidParameter(f"--{flag.replace('_', '-')} must be at least 1", flag)
    if args.max_queue < 0:
        raise InvalidParameter("--max-queue must be at least 0", "max_queue")
    if args.max_handles is not None and args.max_handles < 1:
        raise InvalidParameter("--max-handles must be at least 1", "max_handles")
    if args.max_connections < 1:
        raise InvalidParameter("--max-connections must be at least 1", "max_connections")
    for flag in ("header_timeout", "body_timeout", "keep_alive_timeout"):
        if not getattr(args, flag) > 0:
            raise InvalidParameter(f"--{flag.replace('_', '-')} must be positive", flag)
    from quill.engine import parse_prefix_cache

    prefix_cache = parse_prefix_cache(args.prefix_cache)
    api_keys = read_key_file(args.api_key_file) if args.api_key_file else tuple(k for k in args.api_key or () if k)
    config = ServerConfig(api_keys=api_keys, admin_keys=tuple(k for k in args.admin_key or () if k),
                          store_dir=Path(args.store).expanduser() if args.store else None,
                          max_batch=args.max_batch, max_queue=args.max_queue,
                          max_body_bytes=args.max_body_bytes if args.max_body_bytes is not None else DEFAULT_MAX_BODY_BYTES,
                          max_connections=args.max_connections, header_timeout=args.header_timeout,
                          body_timeout=args.body_timeout, keep_alive_timeout=args.keep_alive_timeout,
                          dtype=args.dtype, device=args.device, compile=args.compile, kv_cache=args.kv_cache,
                          prefix_cache=prefix_cache, prefix_cache_share=args.prefix_cache_share,
                          **({"continuation_ttl": args.continuation_ttl} if args.continuation_ttl else {}),
                          **({"max_handles": args.max_handles} if args.max_handles else {}))
    models = args.models
    if not models and not (args.store or args.load):  # with a store, models can come later (quill push)
        if DEFAULT_MODEL not in bundled_models():
            raise QuillError(f"no MODEL given and the bundled model {DEFAULT_MODEL!r} is not installed "
                             f"(quill/models/{DEFAULT_MODEL}); name a checkpoint folder: quill serve PATH")
        models = [DEFAULT_MODEL]
    state = AppState(config)
    for arg in models:
        name, path = split_model_arg(arg)
        engine = quill.load(path, dtype=args.dtype, device=args.device, compile=args.compile, kv_cache=args.kv_cache)
        name = name or engine.name
        if name in state.models:
            raise InvalidParameter(f"two models are named {name!r}; give one another name with NAME=PATH", "model")
        state.add_model(name, engine)
    for name in args.load or ():  # models of the store (quill/store.py)
        if name in state.models:
            raise InvalidParameter(f"two models are named {name!r}; give one another name with NAME=PATH", "model")
        state.add_model(name, load_stored(name, config.store_dir, dtype=args.dtype, device=args.device,
                                                compile=args.compile, kv_cache=args.kv_cache))
    return state


def load_stored(name: str, root: str | os.PathLike | None = None, **kw):
    """`quill.load` a published model of the store at `root` (default: the default store)."""
    import quill
    from quill.errors import ModelNotFound
    from quill.store import Store, validate_model_name

    store = Store(root)
    validate_model_name(name, "load")
    if store.get(name) is None:
        known = ", ".join(m["name"] for m in store.list()) or "none"
        raise ModelNotFound(f"no stored model named {name!r} in {store.root} (stored: {known})")
    return quill.load(store.path(name), **kw)


def cmd_serve(args: argparse.Namespace) -> None:
    import uvicorn

    if args.threads is not None:
        import torch

        torch.set_num_threads(max(1, args.threads))
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    from quill.server.app import create_app
    from quill.server.connections import protocol

    state = build_state(args)
    app = create_app(state)
    names = ", ".join(state.models)
    logging.getLogger("quill.server").info("serving %s on http://%s:%d (max batch %d, queue %d, auth %s)", names,
                                           args.host, args.port, state.config.max_batch, state.config.max_queue,
                                           "on" if state.config.api_keys else "off")
    cfg = state.config
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, timeout_graceful_shutdown=5,
                access_log=args.log_level == "debug", http=protocol(cfg), timeout_keep_alive=cfg.keep_alive_timeout)
