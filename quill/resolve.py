"""Model names to checkpoint folders: the one place that knows where a model can come from.

`resolve(MODEL)` tries each lookup of LOOKUPS in order and returns the first folder found: a folder on disk,
then a model bundled with the package (quill/models/), then a model published to the default store
(quill/store.py), then a Hugging Face Hub repo id or GPT-2 family alias (quill/hub.py: the cache, else a download). A new source of models is one more function `(name) -> Path | None` in LOOKUPS.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from quill.errors import ModelNotFound

BUNDLED_DIR = Path(__file__).parent / "models"


def bundled_models() -> list[str]:
    """Names of the models shipped inside the package."""
    return sorted(p.name for p in BUNDLED_DIR.iterdir() if (p / "config.json").exists()) if BUNDLED_DIR.is_dir() else []


def folder(path_or_name: str | os.PathLike) -> Path | None:
    """The path itself, when it is a directory."""
    path = Path(path_or_name).expanduser()
    return path if path.is_dir() else None


def bundled(path_or_name: str | os.PathLike) -> Path | None:
    """The bundled model of that name."""
    return BUNDLED_DIR / path_or_name if isinstance(path_or_name, str) and path_or_name in bundled_models() else None


def stored(path_or_name: str | os.PathLike) -> Path | None:
    """The model of that name in the default store."""
    from quill.store import find_stored

    return find_stored(path_or_name) if isinstance(path_or_name, str) else None


def hub(path_or_name: str | os.PathLike) -> Path | None:
    """The Hugging Face Hub repo of that name (`org/name[@revision]`, or an alias such as gpt2), from the cache or
    downloaded; a HubError when the name is one but the model cannot be had."""
    from quill.hub import fetch

    return fetch(path_or_name)


LOOKUPS: tuple[Callable[[str | os.PathLike], Path | None], ...] = (folder, bundled, stored, hub)


def resolve(path_or_name: str | os.PathLike) -> Path:
    """The checkpoint folder a path or model name stands for; ModelNotFound when no lookup knows it."""
    for lookup in LOOKUPS:
        path = lookup(path_or_name)
        if path is not None:
            return path
    known = ", ".join(bundled_models()) or "none"
    raise ModelNotFound(f"no model folder, bundled or stored model named {str(path_or_name)!r}, and it is not a "
                        f"Hub repo id (org/name) or alias (bundled: {known}; aliases: gpt2, gpt2-medium, ...)")
