"""Every model Quill can find, and the commands over them: `quill models`, `quill pull NAME`, `quill rm NAME`.

`list_models()` gathers the bundled models (quill/models/), the default store's (quill/store.py) and the GPT-2
checkpoints in the Hugging Face cache (`huggingface_hub.scan_cache_dir`), each with its size, parameter count
and folder. `quill pull` downloads a Hub model into that cache (a bar per file with bytes, rate and time left; run
it again after an interruption and it continues where it stopped); `quill rm` deletes a cached one.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from quill.errors import CheckpointError, ConfigError, HubUnreachable, InvalidParameter, ModelNotFound
from quill.hub import HubName, cache_dir, download, offline, parse, plan, snapshot_bytes
from quill.resolve import BUNDLED_DIR, bundled_models


@dataclass
class ModelEntry:
    """One model on this machine: where it comes from (bundled, stored, cached), its size and its folder."""

    name: str
    source: str
    bytes: int
    parameters: int | None
    path: str


def _parameters(folder: Path) -> int | None:
    from quill.weights import load_config

    try:
        return load_config(folder).num_params()
    except (ConfigError, CheckpointError):
        return None


def cached_models() -> list[ModelEntry]:
    """The GPT-2 checkpoints of the Hugging Face cache (one entry per cached revision a load can use)."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    from quill.hub import incomplete

    try:
        info = scan_cache_dir(cache_dir())
    except CacheNotFound:
        return []
    out = []
    for repo in sorted(info.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model":
            continue
        for rev in sorted(repo.revisions, key=lambda r: r.last_modified, reverse=True):
            folder = Path(rev.snapshot_path)
            params = _parameters(folder)
            if params is None or incomplete(folder) is not None:
                continue  # another kind of model, or a download that did not finish
            refs = sorted(rev.refs)
            name = repo.repo_id if "main" in refs or not refs else f"{repo.repo_id}@{refs[0]}"
            out.append(ModelEntry(name, "cached", rev.size_on_disk, params, str(folder)))
    return out


def list_models() -> list[ModelEntry]:
    """Bundled, stored and cached models, in the order names resolve."""
    from quill.store import Store

    out = [ModelEntry(n, "bundled", snapshot_bytes(BUNDLED_DIR / n), _parameters(BUNDLED_DIR / n),
                      str(BUNDLED_DIR / n))
           for n in bundled_models()]
    store = Store()
    out += [ModelEntry(m["name"], "stored", m.get("bytes") or 0, m.get("parameters"), str(store.path(m["name"])))
            for m in store.list()]
    return out + cached_models()


def hub_name(name: str) -> HubName:
    """The Hub repo of NAME, or InvalidParameter naming the argument."""
    parsed = parse(name)
    if parsed is None:
        raise InvalidParameter(f"{name!r} is not a Hugging Face repo id (org/name[@revision]) or a GPT-2 alias "
                               f"(gpt2, distilgpt2, gpt2-medium, gpt2-large, gpt2-xl, gpt2-open-instruct-v1)", "name")
    return parsed


def pull(name: str, tqdm_class=None, quiet: bool = False) -> Path:
    """Download NAME from the Hub into the cache (checked to be a GPT-2 checkpoint first); its snapshot folder."""
    parsed = hub_name(name)
    if offline():
        raise HubUnreachable(f"HF_HUB_OFFLINE=1 forbids downloading {parsed}: unset it to pull", str(parsed),
                       str(cache_dir()))
    p = plan(parsed)
    if not quiet:
        print(f"pulling {parsed}: {len(p.files)} files, {_human(p.total_bytes)}", file=sys.stderr, flush=True)
    return download(p, tqdm_class=tqdm_class)


def remove(name: str) -> int:
    """Delete every cached revision of NAME from the Hugging Face cache; the bytes freed."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    parsed = hub_name(name)
    try:
        info = scan_cache_dir(cache_dir())
    except CacheNotFound:
        info = None
    repo = next((r for r in info.repos if r.repo_id == parsed.repo and r.repo_type == "model"), None) if info else None
    if repo is None:
        raise ModelNotFound(f"{parsed.repo} is not in the Hugging Face cache {cache_dir()}")
    strategy = info.delete_revisions(*(r.commit_hash for r in repo.revisions))
    strategy.execute()
    return strategy.expected_freed_size


def _human(n: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def cmd_models(args: argparse.Namespace) -> None:
    import json

    models = list_models()
    if args.json:
        print(json.dumps([asdict(m) for m in models], indent=2))
        return
    rows = [("NAME", "SOURCE", "SIZE", "PARAMETERS", "PATH")]
    rows += [(m.name, m.source, _human(m.bytes), f"{m.parameters:,}" if m.parameters else "?", m.path) for m in models]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[4])


def cmd_pull(args: argparse.Namespace) -> None:
    folder = pull(args.name, quiet=args.quiet)
    print(f"{hub_name(args.name)}: {folder}")


def cmd_rm(args: argparse.Namespace) -> None:
    freed = remove(args.name)
    print(f"removed {hub_name(args.name).repo} from the Hugging Face cache ({_human(freed)} freed)")


def register(subparsers) -> None:
    p = subparsers.add_parser("models", help="list bundled, stored and cached (Hugging Face) models",
                              description="List the models this machine has: bundled with Quill, in the default "
                                          "store, and GPT-2 checkpoints in the Hugging Face cache.")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_models)
    p = subparsers.add_parser("pull", help="download a model from the Hugging Face Hub into its cache",
                              description="Download NAME (org/name[@revision], or gpt2, gpt2-medium, ...) from the "
                                          "Hugging Face Hub (HF_ENDPOINT) into its cache (HF_HOME, HF_HUB_CACHE). "
                                          "Run it again after an interruption: it continues where it stopped.")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--quiet", action="store_true", help="print only the result")
    p.set_defaults(func=cmd_pull)
    p = subparsers.add_parser("rm", help="delete a model from the Hugging Face cache")
    p.add_argument("name", metavar="NAME", help="org/name or an alias (gpt2, ...)")
    p.set_defaults(func=cmd_rm)
