"""Models from the Hugging Face Hub by repo id (`org/name[@revision]` or a GPT-2 family alias), through
`huggingface_hub` and its standard cache.

The Hub's own client does the work, so its variables apply (HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE, HF_TOKEN,
HF_ENDPOINT) and a cache that transformers filled is found without a download. Only what a GPT-2 load needs
is fetched: config, safetensors weights (and index), tokenizer files, generation config; `pytorch_model.bin`
only when the repo has no safetensors (quill.weights reads it with `weights_only=True`).

- `cached(name)`: the model's snapshot folder when the cache holds it whole, with no network call;
- `plan(name)`: list the repo and check its config is GPT-2 *before* any weights are fetched;
- `download(plan)`: each file into a partial file of the cache named for its content (`blobs/<etag>.part`),
  continued with a Range request after a cut connection or by the next run after a Ctrl-C or a crash, checked
  against the listing's SHA-256 (or git blob id) and renamed into place; then `snapshot_download` links the
  snapshot, which is checked before it is handed out;
- `fetch(name)`: the `quill.resolve` lookup: the cache, else plan + download.

Every failure is a typed HubError (quill/errors.py) naming the repo and the endpoint or cache.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from urllib.parse import urlsplit

from quill.errors import (CheckpointError, ConfigError, HubAccessDenied, HubDiskFull, HubError, HubModelNotFound, HubUnreachable,
                          NotGPT2Checkpoint)

# The GPT-2 family by the short names everyone uses, with their sizes (what the web page's picker offers).
ALIASES: dict[str, str] = {
    "gpt2": "openai-community/gpt2",
    "distilgpt2": "distilbert/distilgpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
    "gpt2-open-instruct-v1": "vicgalle/gpt2-open-instruct-v1",
}
FAMILY_PARAMETERS: dict[str, str] = {"gpt2": "124M", "distilgpt2": "82M", "gpt2-medium": "355M",
                                     "gpt2-large": "774M", "gpt2-xl": "1.5B", "gpt2-open-instruct-v1": "124M"}

CONFIG_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "vocab.json",
                "merges.txt", "special_tokens_map.json", "added_tokens.json"]
SAFETENSORS_PATTERNS = ["model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors"]
PICKLE_FILE = "pytorch_model.bin"
# A Hub repo id: owner/name, each of letters, digits, '-', '_', '.'; an optional @revision (branch, tag, commit).
REPO_RE = re.compile(r"([A-Za-z0-9][\w.-]{0,95})/([A-Za-z0-9][\w.-]{0,95})(?:@([\w./-]{1,200}))?")


@dataclass(frozen=True)
class HubName:
    """A Hub repo id and the revision asked for (None: the default branch)."""

    repo: str
    revision: str | None = None

    def __str__(self) -> str:
        return self.repo + (f"@{self.revision}" if self.revision else "")


def parse(name: str | os.PathLike) -> HubName | None:
    """The Hub repo a model name stands for (an alias or `org/name[@revision]`), or None when it is not one."""
    if not isinstance(name, str):
        return None
    base, _, revision = name.partition("@")
    if base in ALIASES:
        return HubName(ALIASES[base], revision or None)
    m = REPO_RE.fullmatch(name)
    if m is None or ".." in name:
        return None
    return HubName(f"{m.group(1)}/{m.group(2)}", m.group(3))


def endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def cache_dir() -> Path:
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def offline() -> bool:
    from huggingface_hub import constants

    return constants.is_offline_mode()


def patterns_for(files: list[str]) -> list[str]:
    """The allow-patterns for a repo holding `files`: safetensors when it has them, else the pickle."""
    has_safetensors = any(fnmatch(f, p) for f in files for p in SAFETENSORS_PATTERNS if p.endswith(".safetensors"))
    return CONFIG_FILES + (SAFETENSORS_PATTERNS if has_safetensors else [PICKLE_FILE])


@contextlib.contextmanager
def hub_errors(name: HubName) -> Iterator[None]:
    """huggingface_hub's exceptions (and the network's, and the disk's) as one-line HubErrors."""
    import httpx2
    from huggingface_hub import errors as hf

    repo, where, cache = str(name), endpoint(), cache_dir()
    try:
        yield
    except HubError:
        raise
    except hf.GatedRepoError:
        token = "the token in HF_TOKEN may not read it" if _has_token() else "set HF_TOKEN to a token that may"
        raise HubAccessDenied(f"{repo} is gated on the Hub at {where}: accept its terms at {where}/{name.repo} "
                              f"and {token}", repo, where) from None
    except hf.RevisionNotFoundError:
        raise HubModelNotFound(f"{name.repo} has no revision {name.revision!r} on the Hub at {where}", repo,
                               where) from None
    except hf.RepositoryNotFoundError:
        raise HubModelNotFound(f"no model {name.repo!r} on the Hub at {where} (a private repo needs HF_TOKEN)",
                               repo, where) from None
    except hf.RemoteEntryNotFoundError as e:
        raise NotGPT2Checkpoint(f"{repo} on the Hub at {where} lacks a file a GPT-2 load needs: "
                                f"{_one_line(e)}", repo, where) from None
    except (hf.OfflineModeIsEnabled, hf.LocalEntryNotFoundError, hf.IncompleteSnapshotError) as e:
        cause = e.__cause__ or e.__context__
        if offline() or isinstance(e, hf.OfflineModeIsEnabled):
            raise HubUnreachable(f"{repo} is not (wholly) in the Hugging Face cache {cache} and HF_HUB_OFFLINE=1 "
                                 f"forbids downloading it from {where}", repo, str(cache)) from None
        if isinstance(cause, hf.HfHubHTTPError):
            raise _http_error(cause, name, where) from None
        raise HubUnreachable(f"cannot reach the Hub at {where} for {repo}, and the Hugging Face cache {cache} "
                             f"does not hold it", repo, where) from None
    except hf.HfHubHTTPError as e:
        raise _http_error(e, name, where) from None
    except httpx2.TransportError as e:
        raise HubUnreachable(f"cannot reach the Hub at {where} for {repo}: {_one_line(e) or type(e).__name__}",
                             repo, where) from None
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise HubDiskFull(f"the disk of the Hugging Face cache {cache} is full while downloading {repo}: free "
                              f"some space (quill rm) or set HF_HUB_CACHE elsewhere", repo, str(cache)) from None
        raise


def _http_error(e, name: HubName, where: str) -> HubError:
    status = getattr(getattr(e, "response", None), "status_code", None)
    if status in (401, 403):
        return HubAccessDenied(f"the Hub at {where} refused {name} (HTTP {status}): a private or gated repo needs "
                               f"HF_TOKEN", str(name), where)
    return HubUnreachable(f"the Hub at {where} answered HTTP {status} for {name}: try again later", str(name), where)


def _has_token() -> bool:
    from huggingface_hub import get_token

    return get_token() is not None


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())[:300]


@dataclass
class Plan:
    """What a download of `name` fetches: the files (name -> bytes) the allow-patterns pick from the listing,
    and each one's checksum from the listing: ("sha256", hex) for LFS files, ("git", blob id) for the others."""

    name: HubName
    patterns: list[str]
    files: dict[str, int] = field(default_factory=dict)
    checksums: dict[str, tuple[str, str]] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return sum(self.files.values())


def plan(name: HubName) -> Plan:
    """List the repo and check that it is a GPT-2 checkpoint (config.json's model_type, weights present), fetching
    only config.json: a wrong repo fails before any weights are downloaded."""
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.hf_api import RepoFile

    with hub_errors(name):
        entries = [f for f in HfApi().list_repo_tree(name.repo, revision=name.revision, recursive=True)
                   if isinstance(f, RepoFile)]
        listing = {f.path: f.size or 0 for f in entries}
        checksums = {f.path: ("sha256", f.lfs.sha256) if f.lfs else ("git", f.blob_id) for f in entries}
        where = f"{endpoint()}/{name.repo}"
        patterns = patterns_for(list(listing))
        if "config.json" not in listing:
            raise NotGPT2Checkpoint(f"{name} at {where} has no config.json: not a transformers checkpoint", str(name),
                                    where)
        if not any(fnmatch(f, p) for f in listing for p in SAFETENSORS_PATTERNS + [PICKLE_FILE]):
            raise NotGPT2Checkpoint(f"{name} at {where} has no weights (model.safetensors, shards or "
                                    f"{PICKLE_FILE})", str(name), where)
        config = hf_hub_download(name.repo, "config.json", revision=name.revision, tqdm_class=silent_bar())
        check_config(Path(config).parent, name, where)
    files = {f: s for f, s in sorted(listing.items()) if any(fnmatch(f, p) for p in patterns)}
    return Plan(name, patterns, files, {f: checksums[f] for f in files})


def check_config(folder: Path, name: HubName, where: str) -> None:
    """NotGPT2Checkpoint unless `folder`'s config.json is one Quill runs (model_type gpt2, supported keys)."""
    from quill.weights import load_config

    try:
        load_config(folder)
    except (ConfigError, CheckpointError) as e:
        raise NotGPT2Checkpoint(f"{name} at {where} is not a GPT-2 checkpoint Quill can load: {e}", str(name),
                                where) from None


def download(p: Plan, tqdm_class=None) -> Path:
    """Fetch the planned files into the cache, each resumable across runs (`fetch_file`), and return the checked
    snapshot. `tqdm_class` is huggingface_hub's per-file bar (named "huggingface_hub.http_get", bytes already
    there as `initial`): drawn on a terminal by default, or a class that counts them (the server's pulls)."""
    from huggingface_hub import snapshot_download

    with hub_errors(p.name):
        for filename in p.files:
            fetch_file(p, filename, tqdm_class)
        # every blob is there now: snapshot_download only links the snapshot and records the revision's ref
        folder = Path(snapshot_download(p.name.repo, revision=p.name.revision, allow_patterns=p.patterns,
                                        tqdm_class=silent_bar()))
    problem = incomplete(folder)
    if problem:
        raise NotGPT2Checkpoint(f"{p.name} from {endpoint()}: {problem}", str(p.name), endpoint())
    return folder


def fetch_file(p: Plan, filename: str, tqdm_class=None) -> None:
    """Download one file of the plan into the cache's blob of its etag, where huggingface_hub looks for it.

    huggingface_hub resumes a cut connection within a run but drops its partial file when the run ends, so a
    Ctrl-C at 90% of gpt2-xl's 6 GB would start over. Here the bytes go to `blobs/<etag>.part` (under the
    client's own lock of that blob), which the next run continues with a Range request; the whole file must
    match the listing's checksum before it is renamed into place, so a partial or corrupt file never loads."""
    from huggingface_hub.file_download import get_hf_file_metadata, hf_hub_url, http_get, repo_folder_name
    from huggingface_hub.utils import WeakFileLock, build_hf_headers

    url = hf_hub_url(p.name.repo, filename, revision=p.name.revision)
    meta = get_hf_file_metadata(url)
    folder = repo_folder_name(repo_id=p.name.repo, repo_type="model")
    blob = cache_dir() / folder / "blobs" / meta.etag
    if blob.exists():
        return
    blob.parent.mkdir(parents=True, exist_ok=True)
    lock = cache_dir() / ".locks" / folder / f"{meta.etag}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    headers = build_hf_headers()
    if urlsplit(meta.location).netloc != urlsplit(url).netloc:
        headers.pop("authorization", None)  # as huggingface_hub does: the token is not sent to the CDN
    part = blob.with_name(blob.name + ".part")
    with WeakFileLock(lock):
        if blob.exists():  # another process finished it while this one waited
            return
        have = part.stat().st_size if part.exists() else 0
        if meta.size is not None and have > meta.size:
            have = 0
        try:
            with open(part, "r+b" if have else "wb") as f:
                f.truncate(have)
                f.seek(have)
                http_get(meta.location, f, resume_size=have, headers=headers, expected_size=meta.size,
                         displayed_filename=filename, tqdm_class=tqdm_class)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                part.unlink(missing_ok=True)  # it cannot be finished on this disk: give the space back
                raise
            if type(e) is OSError and e.errno is None:  # http_get's size check (the Hub's errors subclass OSError)
                # the connection ended early and the client's retries ran out
                raise HubUnreachable(f"the download of {filename} of {p.name} from {endpoint()} ended early: "
                                     f"run it again to continue", str(p.name), endpoint()) from None
            raise
        if not matches(part, p.checksums.get(filename)):
            part.unlink()
            raise HubUnreachable(f"{filename} of {p.name} from {endpoint()} does not match the checksum of the "
                                 f"Hub's listing (the partial download was removed): run it again", str(p.name),
                                 endpoint())
        os.replace(part, blob)


def matches(path: Path, checksum: tuple[str, str] | None) -> bool:
    """Whether the file has the listing's checksum: the SHA-256 of an LFS file, the git blob id of another."""
    if checksum is None:
        return True
    kind, want = checksum
    h = hashlib.sha256() if kind == "sha256" else hashlib.sha1(b"blob %d\0" % path.stat().st_size)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest() == want


def silent_bar():
    """A huggingface_hub tqdm class that draws nothing (the per-file bars of `download` say it all)."""
    from huggingface_hub.utils import tqdm as hf_tqdm

    class Silent(hf_tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return Silent


def incomplete(folder: Path) -> str | None:
    """What a GPT-2 load would miss in `folder` (config, every weight file, a tokenizer), or None when whole."""
    if not (folder / "config.json").is_file():
        return "no config.json"
    index = folder / "model.safetensors.index.json"
    if (folder / "model.safetensors").is_file():
        pass
    elif index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError):
            return f"{index.name} is malformed"
        missing = sorted(s for s in shards if not (folder / s).is_file())
        if missing:
            return f"shard {missing[0]} is missing"
    elif not (folder / PICKLE_FILE).is_file():
        return "no weights (model.safetensors, shards or pytorch_model.bin)"
    if not ((folder / "tokenizer.json").is_file() or (folder / "vocab.json").is_file()
            and (folder / "merges.txt").is_file()):
        return "no tokenizer (tokenizer.json, or vocab.json and merges.txt)"
    return None


def snapshot_bytes(folder: Path) -> int:
    """The bytes of a model folder's files (a cache snapshot's symlinks followed to their blobs)."""
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def cached(name: HubName) -> Path | None:
    """The snapshot of `name` when the cache holds everything a load needs; never touches the network."""
    from huggingface_hub import get_cached_repo_tree, snapshot_download
    from huggingface_hub import errors as hf

    try:
        files = [f.path for f in get_cached_repo_tree(name.repo, revision=name.revision)]
        patterns = patterns_for(files)
    except hf.CachedRepoTreeNotFoundError:  # filled by an older client (no tree listing): take what is there
        patterns = CONFIG_FILES + SAFETENSORS_PATTERNS + [PICKLE_FILE]
    try:
        folder = Path(snapshot_download(name.repo, revision=name.revision, allow_patterns=patterns,
                                        local_files_only=True))
    except (hf.LocalEntryNotFoundError, hf.IncompleteSnapshotError, OSError):
        return None
    return folder if incomplete(folder) is None else None


def fetch(name: str | os.PathLike) -> Path | None:
    """`quill.resolve`'s lookup: the snapshot folder of a Hub name (downloading it when the cache lacks it), or None
    when `name` is not a Hub name."""
    hub_name = parse(name)
    if hub_name is None:
        return None
    folder = cached(hub_name)
    if folder is not None:
        return folder
    if offline():
        raise HubUnreachable(f"{hub_name} is not in the Hugging Face cache {cache_dir()} and HF_HUB_OFFLINE=1 "
                             f"forbids downloading it from {endpoint()}", str(hub_name), str(cache_dir()))
    return download(plan(hub_name))
