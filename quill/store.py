"""The model store: published models as folders under one directory, resumable uploads beside them.

Independent of HTTP and of the engine: the server (`quill.server.routes_store`) drives it and maps its error
codes to HTTP statuses; `quill.load(NAME)` finds its models through `quill.resolve`.

Layout of a store directory (default `platformdirs.user_data_dir("quill")/models`, or `$QUILL_STORE`)::

    <root>/<name>/                       a published model: config.json, model.safetensors (or shards + index),
                                         tokenizer files, ... and quill-store.json (the manifest, written last)
    <root>/.uploads/<uid>, <uid>.info    uploads in progress or complete (tuspyserver's layout: data + sidecar)
    <root>/.staging/<name>.<hex>/        a commit being assembled (deleted at start)
    <root>/.trash/<name>.<hex>.old|.del  a model being replaced or deleted (restored or deleted at start)
    <root>/.lock                         held (flock) by the server that owns the store

Durability: a model is assembled in `.staging` (files fsynced, manifest written last), then published with one
`rename` and an fsync of the root, so a model folder either does not exist or is complete. `recover()` (run at
server start) removes what a crash left half-done. An upload's sidecar never claims bytes that are not fsynced
(see `DurableUploadStorage` in routes_store), and `recover()` cuts data past the sidecar's offset.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import threading
import time
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any

from quill.atomic import fsync_dir, write_json_durably
from quill.errors import CheckpointError, ConfigError, QuillError, TokenizerError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no store lock
    fcntl = None

log = logging.getLogger("quill.store")

MANIFEST = "quill-store.json"
UPLOADS, STAGING, TRASH, LOCK = ".uploads", ".staging", ".trash", ".lock"
DEFAULT_MAX_FILE_BYTES = 16 * 1024**3
DEFAULT_MAX_MODEL_BYTES = 64 * 1024**3
MAX_NAME_LENGTH = 64
MAX_HEADER_BYTES = 100_000_000  # a safetensors JSON header larger than this is corrupt

# Files a model may hold, by kind (how commit checks them). Weights are safetensors only: no pickles.
JSON_FILES = {"config.json", "generation_config.json", "model.safetensors.index.json", "tokenizer.json",
              "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "added_tokens.json"}
TEXT_FILES = {"merges.txt", "README.md", "chat_template.jinja"}
SAFETENSORS_FILES = {"model.safetensors"}  # int8 models (`quill quantize`) are whole checkpoints of their own
SHARD_RE = re.compile(r"model-(\d{5})-of-(\d{5})\.safetensors")
MODEL_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
REFUSED_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".h5", ".msgpack", ".npz", ".npy", ".joblib")
SHA256_RE = re.compile(r"[0-9a-f]{64}")
UID_RE = re.compile(r"[0-9a-f]{32}")

_ST_DTYPES: dict[str, int] = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                              "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
_ST_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}


class StoreError(QuillError):
    """A refused store operation: `code` says what kind (the server maps it to an HTTP status), `param` names the
    file or field."""

    def __init__(self, message: str, code: str, param: str | None = None):
        super().__init__(message)
        self.code, self.param = code, param


def disk_full(what: str, param: str | None = None) -> StoreError:
    return StoreError(f"the store's disk is full while {what}; nothing was changed", "insufficient_storage",
                      param)


def default_store_dir() -> Path:
    """`$QUILL_STORE`, else `platformdirs.user_data_dir("quill")/models`."""
    env = os.environ.get("QUILL_STORE")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_data_dir

    return Path(user_data_dir("quill")) / "models"


def parse_size(text: str | int, param: str = "size") -> int:
    """'2MB' / '512KiB' / '1g' / '1048576' -> bytes (K, M, G, T and their KB/KiB forms are powers of 1024)."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise StoreError(f"invalid size {text!r} (examples: 2MB, 512KiB, 1048576)", "invalid_value", param)
    return int(float(m.group(1)) * 1024 ** "_kmgt".index(m.group(2).lower() or "_"))


def limits_from_env() -> dict[str, int]:
    """Store limits from $QUILL_STORE_MAX_FILE_BYTES and $QUILL_STORE_MAX_MODEL_BYTES (sizes like '4GB')."""
    out = {}
    for key, env in (("max_file_bytes", "QUILL_STORE_MAX_FILE_BYTES"), ("max_model_bytes", "QUILL_STORE_MAX_MODEL_BYTES")):
        if os.environ.get(env):
            out[key] = parse_size(os.environ[env], env)
    return out


# ---- names -------------------------------------------------------------------------------------------------------


def validate_model_name(name: Any, param: str = "model") -> str:
    """A model name: letters, digits, '.', '_', '-', starting with a letter or digit, no '..', at most 64 chars."""
    if not isinstance(name, str) or not name:
        raise StoreError("a model name is required", "invalid_model_name", param)
    if len(name) > MAX_NAME_LENGTH:
        raise StoreError(f"model name is longer than {MAX_NAME_LENGTH} characters", "invalid_model_name", param)
    if not MODEL_NAME_RE.fullmatch(name) or ".." in name:
        raise StoreError(f"invalid model name {name!r}: use letters, digits, '.', '_' and '-' (starting with a letter "
                         f"or digit, no '..', no path separators)", "invalid_model_name", param)
    return name


def file_kind(name: str) -> str | None:
    """'json', 'text', 'safetensors' or 'shard' for an accepted file name, else None."""
    if name in JSON_FILES:
        return "json"
    if name in TEXT_FILES:
        return "text"
    if name in SAFETENSORS_FILES:
        return "safetensors"
    m = SHARD_RE.fullmatch(name)
    if m and 1 <= int(m.group(1)) <= int(m.group(2)):
        return "shard"
    return None


def validate_file_name(name: Any, param: str | None = None) -> str:
    """A file name from the store's allow-list (docs/store.md); anything else, pickles first, is refused."""
    if not isinstance(name, str) or not name:
        raise StoreError("a file name is required", "invalid_file_name", param or "filename")
    shown = name if len(name) <= 100 else name[:100] + "..."
    if "/" in name or "\\" in name or "\0" in name or name in (".", "..") or len(name) > 128:
        raise StoreError(f"invalid file name {shown!r}: no paths, just a file name", "invalid_file_name",
                         param or name[:128])
    if name.lower().endswith(REFUSED_SUFFIXES):
        raise StoreError(f"{name}: pickle-based and other executable weight formats are not accepted; convert the "
                         f"weights to safetensors", "unsupported_file_type", param or name)
    if file_kind(name) is None:
        raise StoreError(f"{name} is not a file the store accepts (config.json, model.safetensors, "
                         f"model-XXXXX-of-XXXXX.safetensors, model.safetensors.index.json, tokenizer files, "
                         f"README.md, ...: see docs/store.md)", "invalid_file_name", param or name)
    return name


# ---- files -----------------------------------------------------------------------------------------------------------


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)  # same filesystem: no copy, and the upload's data is already fsynced
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise
        with open(src, "rb") as fi, open(dst, "wb") as fo:
            shutil.copyfileobj(fi, fo, 1 << 20)
            fo.flush()
            os.fsync(fo.fileno())


# ---- uploads (tuspyserver's on-disk layout) ----------------------------------------------------------------------


@dataclass
class Upload:
    """One tus upload as its sidecar describes it."""

    uid: str
    path: Path
    model: str | None
    filename: str | None
    size: int | None
    offset: int
    created: str
    expires: str | None

    @property
    def complete(self) -> bool:
        return self.size is not None and self.offset == self.size

    @property
    def expired(self) -> bool:
        if not self.expires:
            return False
        try:
            when = parsedate_to_datetime(self.expires)
        except (TypeError, ValueError):
            return False
        return when.timestamp() < time.time()

    def as_dict(self) -> dict[str, Any]:
        return {"id": self.uid, "model": self.model, "filename": self.filename, "size": self.size,
                "offset": self.offset, "complete": self.complete, "created": self.created, "expires": self.expires}


def upload_metadata(meta: dict) -> tuple[Any, Any]:
    """(model, filename) named by tus Upload-Metadata (`model`, and `filename` or `name` as Uppy sends)."""
    return meta.get("model"), meta.get("filename") or meta.get("name")


def read_upload(uploads_dir: Path, uid: str) -> Upload | None:
    """The upload `uid` from its sidecar, or None when it has none (or an unreadable one)."""
    if not UID_RE.fullmatch(uid):
        return None
    try:
        info = json.loads((uploads_dir / f"{uid}.info").read_text())
        meta = info.get("metadata") or {}
        model, filename = upload_metadata(meta)
        return Upload(uid, uploads_dir / uid, model, filename, info.get("size"), int(info.get("offset") or 0),
                      str(info.get("created_at", "")), info.get("expires"))
    except (OSError, ValueError, TypeError, AttributeError):
        return None


# ---- safetensors headers -------------------------------------------------------------------------------------------


def read_safetensors_header(path: Path, name: str | None = None) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{tensor: (dtype, shape)} of a safetensors file, checking that the header is well formed and that the file
    holds exactly the bytes the header describes (a truncated or padded file is an error naming it)."""
    name = name or path.name

    def bad(msg: str) -> StoreError:
        return StoreError(f"{name} {msg}", "invalid_safetensors", name)

    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise bad(f"is truncated: {size} bytes, not even a safetensors header")
        n = int.from_bytes(head, "little")
        if n > MAX_HEADER_BYTES:
            raise bad(f"is not a safetensors file (header length {n} is implausible)")
        if 8 + n > size:
            raise bad(f"is truncated: its header needs {8 + n} bytes, the file has {size}")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise bad(f"has a corrupt header (not JSON: {e})") from None
    if not isinstance(header, dict):
        raise bad("has a corrupt header (not a JSON object)")
    out: dict[str, tuple[str, tuple[int, ...]]] = {}
    spans = []
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
            if dtype not in _ST_DTYPES or not all(isinstance(d, int) and d >= 0 for d in shape):
                raise ValueError
            if not (isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end):
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise bad(f"has a corrupt header entry for tensor {key!r}") from None
        numel = 1
        for d in shape:
            numel *= d
        if end - begin != numel * _ST_DTYPES[dtype]:
            raise bad(f"is corrupt: tensor {key!r} ({dtype}, shape {list(shape)}) spans {end - begin} bytes")
        out[key] = (dtype, shape)
        spans.append((begin, end))
    spans.sort()
    pos = 0
    for begin, end in spans:
        if begin != pos:
            raise bad("is corrupt: its tensors overlap or leave holes")
        pos = end
    data = size - 8 - n
    if data < pos:
        raise bad(f"is truncated: its header describes {8 + n + pos} bytes, the file has {size}")
    if data > pos:
        raise bad(f"is corrupt: {data - pos} bytes follow the last tensor")
    return out


# ---- checking a model folder ---------------------------------------------------------------------------------------


def _tensor_file(message: str, where: dict[str, str], default: str) -> str:
    m = re.search(r"tensor '([^']+)'", message)
    return where.get(m.group(1), default) if m else default


def check_model_folder(folder: Path, files: list[str] | None = None) -> dict[str, Any]:
    """Validate a model folder as the store publishes it; StoreError (naming the file) on the first problem.

    JSON files parse as objects and text files as UTF-8; config.json is a config Quill runs; every safetensors
    file has a sound header and exactly its bytes; the tensors match the config under `quill.weights`' strict
    mapping (floating point, every name and shape); an index names exactly the shards given; the tokenizer loads
    and fits the vocabulary. Returns the manifest fields (parameters, context_length, ...).
    """
    import torch

    from quill import quantize as quantization
    from quill.model import GPT
    from quill.weights import hf_to_quill, load_config

    files = sorted(files if files is not None else (p.name for p in folder.iterdir() if p.is_file()))
    for fn in files:
        kind = file_kind(fn)
        raw = (folder / fn).read_bytes() if kind in ("json", "text") else None
        if kind == "json":
            try:
                value = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                code = "invalid_tokenizer" if fn in ("tokenizer.json", "vocab.json") else "invalid_json"
                raise StoreError(f"{fn} is not valid JSON: {e}", code, fn) from None
            if not isinstance(value, dict):
                raise StoreError(f"{fn} must hold a JSON object", "invalid_json", fn)
        elif kind == "text":
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise StoreError(f"{fn} is not UTF-8 text: {e}", "invalid_text", fn) from None
    if "config.json" not in files:
        raise StoreError("config.json is missing: a model needs its config", "missing_file", "config.json")
    try:
        cfg = load_config(folder)
    except (ConfigError, CheckpointError) as e:
        raise StoreError(f"config.json: {e}", "invalid_config", "config.json") from None
    try:
        quantized = quantization.quantization_config(folder) is not None
    except CheckpointError as e:
        raise StoreError(f"config.json: {e}", "invalid_config", "config.json") from None

    # weights
    shards = [f for f in files if file_kind(f) == "shard"]
    index = "model.safetensors.index.json"
    if "model.safetensors" in files and (shards or index in files):
        raise StoreError("give either model.safetensors or shards with model.safetensors.index.json, not both",
                         "conflicting_files", index if index in files else shards[0])
    headers = {f: read_safetensors_header(folder / f) for f in files if file_kind(f) in ("safetensors", "shard")}
    if "model.safetensors" in files:
        main, weight_files = "model.safetensors", ["model.safetensors"]
    elif index in files:
        main, weight_files = index, shards
        weight_map = json.loads((folder / index).read_text()).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise StoreError(f"{index} needs a 'weight_map' object of tensor -> shard file", "invalid_index", index)
        for shard in sorted(set(weight_map.values())):
            if shard not in shards:
                raise StoreError(f"{index} names shard {shard!r}, which is not among the files", "missing_file",
                                 shard if file_kind(shard) == "shard" else index)
        for shard in shards:
            listed = {t for t, s in weight_map.items() if s == shard}
            held = set(headers[shard])
            if listed != held:
                odd = sorted(listed ^ held)[0]
                raise StoreError(f"{shard} and {index} disagree about tensor {odd!r}", "invalid_index", shard)
    elif shards:
        raise StoreError(f"shards need {index}", "missing_file", index)
    else:
        raise StoreError("no weights: expected model.safetensors, or shards with model.safetensors.index.json",
                         "missing_file", "model.safetensors")
    where = {t: f for f in weight_files for t in headers[f]}
    if quantized:  # an int8 checkpoint of `quill quantize`: its own strict loader checks names, dtypes, shapes
        try:
            quantization.load_quantized(folder)
        except (CheckpointError, ValueError, RuntimeError) as e:
            raise StoreError(f"{main} does not match config.json: {e}", "weights_mismatch", main) from None
        return {**_tokenizer_fields(folder, files, cfg), "parameters": cfg.num_params(),
                "context_length": cfg.n_positions, "vocab_size": cfg.vocab_size, "dtype": "int8"}
    dtypes = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    tensors = {t: torch.empty(shape, dtype=dtypes.get(dt, torch.uint8), device="meta")
               for f in weight_files for t, (dt, shape) in headers[f].items()}
    with torch.device("meta"):
        model = GPT(cfg)
    try:
        mapped = hf_to_quill(tensors, model)
    except CheckpointError as e:
        raise StoreError(f"{_tensor_file(str(e), where, main)} does not match config.json: {e}",
                         "weights_mismatch", _tensor_file(str(e), where, main)) from None
    stored_dtypes = set()
    for key, t in mapped.items():
        name = key if key in where else key.removeprefix("transformer.")
        dt = headers[where[name]][name][0] if name in where else None
        if dt is not None and dt not in dtypes:
            raise StoreError(f"{where[name]}: tensor {name!r} has dtype {dt}, expected floating point",
                             "weights_mismatch", where[name])
        if dt is not None:
            stored_dtypes.add(_ST_NAMES[dt])
    return {**_tokenizer_fields(folder, files, cfg), "parameters": cfg.num_params(),
            "context_length": cfg.n_positions, "vocab_size": cfg.vocab_size,
            "dtype": ",".join(sorted(stored_dtypes)) or None}


def _tokenizer_fields(folder: Path, files: list[str], cfg) -> dict[str, Any]:
    """Check that the tokenizer loads and fits the model's vocabulary."""
    from quill.tokenizer import Tokenizer

    tok_file = "tokenizer.json" if "tokenizer.json" in files else "vocab.json" if "vocab.json" in files else None
    if tok_file is None:
        raise StoreError("no tokenizer: expected tokenizer.json (or vocab.json + merges.txt)", "missing_file",
                         "tokenizer.json")
    try:
        tok = Tokenizer.load(folder)
    except (TokenizerError, ValueError, TypeError, KeyError, OSError) as e:
        msg = str(e).replace(str(folder) + os.sep, "").replace(str(folder), "the model folder")
        raise StoreError(f"{tok_file}: the tokenizer does not load: {msg}", "invalid_tokenizer", tok_file) from None
    if tok.vocab_size > cfg.vocab_size:
        raise StoreError(f"{tok_file}: the tokenizer has {tok.vocab_size} tokens but config.json's vocab_size is "
                         f"{cfg.vocab_size}", "invalid_tokenizer", tok_file)
    return {"has_chat_template": tok.has_chat_template}


# ---- the store ---------------------------------------------------------------------------------------------------


class Store:
    """A store directory: `commit` publishes uploads as a model, `list`/`get`/`delete` manage published models."""

    def __init__(self, root: str | os.PathLike | None = None, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
                 max_model_bytes: int = DEFAULT_MAX_MODEL_BYTES):
        self.root = Path(root).expanduser() if root is not None else default_store_dir()
        self.max_file_bytes, self.max_model_bytes = max_file_bytes, max_model_bytes
        self.uploads_dir = self.root / UPLOADS
        self._lock = threading.RLock()
        self._lock_fd: int | None = None

    def ensure(self) -> None:
        for d in (self.root, self.uploads_dir):
            d.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        return self.root / validate_model_name(name)

    # -- start-up -----------------------------------------------------------------------------------------------

    def acquire(self) -> bool:
        """Take the store's lock (flock on <root>/.lock) for this process; False when another process holds it."""
        if self._lock_fd is not None or fcntl is None:
            return True
        fd = os.open(self.root / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            return False
        self._lock_fd = fd
        return True

    def release(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def recover(self) -> list[str]:
        """Undo what a crash left: staging folders, half-done replacements and deletions, upload data past its
        sidecar's offset, orphaned or expired uploads. Returns what it did. Call with the store's lock held."""
        done: list[str] = []
        if not self.root.is_dir():
            return done
        staging = self.root / STAGING
        for p in sorted(staging.iterdir()) if staging.is_dir() else ():
            shutil.rmtree(p, ignore_errors=True)
            done.append(f"removed unpublished staging folder {p.name}")
        trash = self.root / TRASH
        for p in sorted(trash.iterdir()) if trash.is_dir() else ():
            name, _, rest = p.name.partition(".")
            target = self.root / name
            if p.name.endswith(".old") and MODEL_NAME_RE.fullmatch(name) and not target.exists() \
                    and (p / MANIFEST).is_file():
                os.rename(p, target)
                fsync_dir(self.root)
                done.append(f"restored {name} (its replacement was interrupted)")
            else:
                shutil.rmtree(p, ignore_errors=True)
                done.append(f"removed {p.name} from the trash")
        up = self.uploads_dir
        if up.is_dir():
            names = set(os.listdir(up))
            for fn in sorted(names):
                path = up / fn
                if fn.endswith(".tmp"):
                    path.unlink(missing_ok=True)
                    done.append(f"removed temporary file {fn}")
                elif UID_RE.fullmatch(fn) and f"{fn}.info" not in names:
                    path.unlink(missing_ok=True)  # created, crashed before its sidecar was written
                    done.append(f"removed upload {fn} without metadata")
                elif fn.endswith(".info") and UID_RE.fullmatch(fn[:-5]):
                    self._recover_upload(fn[:-5], fn[:-5] in names, done)
            locks = up / ".locks"  # tuspyserver's lock files (flock: a dead process holds none)
            for p in locks.glob("*.lock") if locks.is_dir() else ():
                if not (up / p.name[:-5]).exists():
                    p.unlink(missing_ok=True)
        return done

    def _recover_upload(self, uid: str, has_data: bool, done: list[str]) -> None:
        u = read_upload(self.uploads_dir, uid)
        if u is None or not has_data or u.expired:
            self.remove_upload(uid)
            done.append(f"removed upload {uid} ({'expired' if u and u.expired else 'incomplete metadata'})")
            return
        size = u.path.stat().st_size
        if size > u.offset:  # bytes of a PATCH the crash interrupted: the sidecar never acknowledged them
            with open(u.path, "r+b") as f:
                f.truncate(u.offset)
                os.fsync(f.fileno())
            done.append(f"cut upload {uid} back to its acknowledged offset {u.offset} (was {size} bytes)")
        elif size < u.offset:  # cannot happen with fsync-before-sidecar; never claim bytes that are not there
            info = json.loads((self.uploads_dir / f"{uid}.info").read_text())
            info["offset"] = size
            write_json_durably(self.uploads_dir / f"{uid}.info", info)
            done.append(f"upload {uid}: offset corrected from {u.offset} to {size}")

    # -- uploads -------------------------------------------------------------------------------------------------

    def uploads(self, model: str | None = None) -> list[Upload]:
        """Uploads with a sidecar (oldest first), only those for `model` if given."""
        if not self.uploads_dir.is_dir():
            return []
        out = []
        for fn in os.listdir(self.uploads_dir):
            if fn.endswith(".info") and UID_RE.fullmatch(fn[:-5]):
                u = read_upload(self.uploads_dir, fn[:-5])
                if u is not None and (model is None or u.model == model):
                    out.append(u)
        return sorted(out, key=lambda u: (u.created, u.uid))

    def remove_upload(self, uid: str) -> None:
        for p in (self.uploads_dir / uid, self.uploads_dir / f"{uid}.info"):
            p.unlink(missing_ok=True)

    def check_upload(self, model: Any, filename: Any, length: int | None) -> tuple[str, str]:
        """Refuse a new upload with a bad model or file name, too large, or larger than the free disk space."""
        model = validate_model_name(model, "model")
        filename = validate_file_name(filename, "filename")
        if length is None:
            raise StoreError("uploads need Upload-Length (deferred lengths are not supported)", "invalid_value",
                             filename)
        if length > self.max_file_bytes:
            raise StoreError(f"{filename} is {length} bytes; the store accepts files of at most {self.max_file_bytes}",
                             "file_too_large", filename)
        sizes: dict[str, int] = {}
        for u in self.uploads(model):
            if u.filename != filename and u.size is not None:
                sizes[u.filename] = max(sizes.get(u.filename, 0), u.size)
        total = sum(sizes.values()) + length
        if total > self.max_model_bytes:
            raise StoreError(f"{filename}: the files of model {model!r} would total {total} bytes; the store accepts "
                             f"at most {self.max_model_bytes} per model", "model_too_large", filename)
        self.ensure()
        free = shutil.disk_usage(self.uploads_dir).free
        if length > free:
            raise StoreError(f"{filename} is {length} bytes but the store's disk has {free} bytes free",
                             "insufficient_storage", filename)
        return model, filename

    def supersede(self, uid: str) -> None:
        """Drop other uploads of the same model and file once `uid` completes: the last complete upload wins."""
        u = read_upload(self.uploads_dir, uid)
        if u is None:
            return
        for other in self.uploads(u.model):
            if other.uid != uid and other.filename == u.filename:
                self.remove_upload(other.uid)

    # -- published models ---------------------------------------------------------------------------------------

    def get(self, name: str) -> dict[str, Any] | None:
        """The manifest of the published model `name`, or None."""
        try:
            validate_model_name(name)
            manifest = json.loads((self.root / name / MANIFEST).read_text())
        except (StoreError, OSError, ValueError):
            return None
        return manifest if isinstance(manifest, dict) else None

    def list(self) -> list[dict[str, Any]]:
        """Manifests of the published models, by name. Folders without a manifest are not models."""
        if not self.root.is_dir():
            return []
        out = []
        for p in sorted(self.root.iterdir()):
            if p.is_dir() and not p.name.startswith("."):
                m = self.get(p.name)
                if m is not None:
                    out.append(m)
        return out

    def commit(self, name: str, files: dict[str, str], replace: bool = False) -> dict[str, Any]:
        """Verify the uploads of `name` against their SHA-256s, check them as a model and publish them atomically.

        `files` maps each file name to its expected SHA-256 (hex). On any failure nothing is published and the
        uploads stay, so a bad file can be uploaded again and the commit retried.
        """
        name = validate_model_name(name, "name")
        if not isinstance(files, dict) or not files:
            raise StoreError("files must map at least one file name to its SHA-256", "invalid_value", "files")
        expected = {}
        for fn, digest in files.items():
            validate_file_name(fn)
            if not isinstance(digest, str) or not SHA256_RE.fullmatch(digest.lower()):
                raise StoreError(f"{fn}: expected a SHA-256 as 64 hex digits", "invalid_value", fn)
            expected[fn] = digest.lower()
        with self._lock:
            if (self.root / name).exists() and not replace:
                raise StoreError(f"model {name!r} is already in the store: commit with \"replace\": true, or delete "
                                 f"it first", "model_exists", "name")
            chosen = self._pick_uploads(name, expected)
            total = sum(u.size or 0 for u in chosen.values())
            if total > self.max_model_bytes:
                raise StoreError(f"the files total {total} bytes; the store accepts at most {self.max_model_bytes} per "
                                 f"model", "model_too_large", "files")
            staging = self.root / STAGING / f"{name}.{secrets.token_hex(6)}"
            try:
                staging.mkdir(parents=True)
                for fn, u in chosen.items():
                    _link_or_copy(u.path, staging / fn)
                fields = check_model_folder(staging, sorted(chosen))
                manifest = {"name": name, "created": int(time.time()), **fields,
                            "files": {fn: {"bytes": u.size, "sha256": expected[fn]} for fn, u in sorted(chosen.items())},
                            "bytes": total}
                write_json_durably(staging / MANIFEST, manifest)
                fsync_dir(staging)
                self._publish(name, staging)
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise disk_full(f"publishing {name!r}") from None
                raise StoreError(f"cannot publish {name!r}: {e.strerror or e}", "store_error") from None
            finally:
                if staging.exists():
                    shutil.rmtree(staging, ignore_errors=True)
            for u in self.uploads(name):
                self.remove_upload(u.uid)
            return manifest

    def _pick_uploads(self, name: str, expected: dict[str, str]) -> dict[str, Upload]:
        uploads = self.uploads(name)
        chosen = {}
        for fn, digest in sorted(expected.items()):
            mine = [u for u in uploads if u.filename == fn]
            done = [u for u in reversed(mine) if u.complete and u.path.is_file()]
            if not done:
                if mine:
                    u = mine[-1]
                    raise StoreError(f"{fn}: the upload is incomplete ({u.offset} of {u.size} bytes): resume it, then "
                                     f"commit", "upload_incomplete", fn)
                raise StoreError(f"{fn} was not uploaded for model {name!r}", "upload_missing", fn)
            actual = None
            for u in done:
                actual = sha256_file(u.path)
                if actual == digest:
                    chosen[fn] = u
                    break
            else:
                raise StoreError(f"{fn}: checksum mismatch: the uploaded file has SHA-256 {actual}, expected {digest}",
                                 "checksum_mismatch", fn)
        return chosen

    def _publish(self, name: str, staging: Path) -> None:
        target, old = self.root / name, None
        if target.exists():
            old = self.root / TRASH / f"{name}.{secrets.token_hex(6)}.old"
            old.parent.mkdir(exist_ok=True)
            os.rename(target, old)  # a crash before the next rename is undone by recover(): old is restored
        os.rename(staging, target)
        fsync_dir(staging.parent)
        fsync_dir(self.root)
        if old is not None:
            fsync_dir(old.parent)
            shutil.rmtree(old, ignore_errors=True)

    def delete(self, name: str) -> None:
        """Remove the published model `name` (and its pending uploads)."""
        name = validate_model_name(name, "name")
        with self._lock:
            target = self.root / name
            if not target.is_dir() or self.get(name) is None:
                raise StoreError(f"no stored model named {name!r}", "model_not_found", "name")
            gone = self.root / TRASH / f"{name}.{secrets.token_hex(6)}.del"
            gone.parent.mkdir(exist_ok=True)
            os.rename(target, gone)
            fsync_dir(self.root)
            shutil.rmtree(gone, ignore_errors=True)
            for u in self.uploads(name):
                self.remove_upload(u.uid)


def find_stored(name: str, root: str | os.PathLike | None = None) -> Path | None:
    """The folder of the published model `name` in `root` (default: the default store), or None."""
    try:
        validate_model_name(name)
    except StoreError:
        return None
    path = (Path(root).expanduser() if root is not None else default_store_dir()) / name
    return path if (path / MANIFEST).is_file() else None

