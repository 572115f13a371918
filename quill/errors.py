"""Typed exceptions: every bad input surfaces as one of these, naming what was wrong."""

from __future__ import annotations


class QuillError(Exception):
    """Base of every error Quill raises on purpose."""


class ConfigError(QuillError, ValueError):
    """A model configuration that Quill cannot run; `field` names the offending key."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


class CheckpointError(QuillError):
    """A checkpoint file that is missing, truncated, corrupt or does not match its config."""

    def __init__(self, message: str, file: str | None = None):
        super().__init__(message)
        self.file = file


class TokenizerError(QuillError):
    """A tokenizer that cannot be loaded or built."""


class InvalidParameter(QuillError, ValueError):
    """A request parameter outside its allowed range; `param` names it (as the HTTP API does)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class ContextLengthError(InvalidParameter):
    """A prompt (plus requested tokens) that does not fit in the model's context window."""


class BudgetError(InvalidParameter):
    """A FLOP budget too small for the work that must come first; `minimum` is what would do."""

    def __init__(self, message: str, param: str | None = "max_flops", minimum: int = 0):
        super().__init__(message, param)
        self.minimum = minimum


class ContinuationError(InvalidParameter):
    """A continuation handle that is unknown, expired, another key's, or another model's; `code` says which."""

    def __init__(self, message: str, code: str):
        super().__init__(message, "continuation")
        self.code = code


class ModelNotFound(QuillError):
    """A model name that no lookup of quill/resolve.py knows (folder, bundled, stored, Hugging Face Hub)."""


class HubError(QuillError):
    """A Hugging Face Hub model that could not be had; `repo` is what was looked for, `where` the endpoint or
    cache it was looked for in."""

    def __init__(self, message: str, repo: str, where: str):
        super().__init__(message)
        self.repo, self.where = repo, where


class HubModelNotFound(HubError, ModelNotFound):
    """No such repo (or revision) on the Hub, or one that is private to others."""


class HubAccessDenied(HubError):
    """A gated or private repo, and no token (HF_TOKEN) that may read it."""


class NotGPT2Checkpoint(HubError):
    """A repo that is not a GPT-2 checkpoint Quill can load: another model_type, no weights or no tokenizer."""


class HubUnreachable(HubError):
    """The Hub cannot be reached (no network, offline mode, an error on its side) and the cache lacks the model."""


class HubDiskFull(HubError):
    """The disk of the Hugging Face cache filled up during a download (nothing half-written is kept)."""
