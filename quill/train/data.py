"""Datasets: a text file tokenised once into uint16 token files, and reproducible random batches from them.

A prepared dataset folder holds `train.bin` and `val.bin` (flat little-endian uint16 token ids), the tokenizer
(`tokenizer.json`, `tokenizer_config.json`) and `meta.json`. The split is made on characters (the first 90% of the
text trains, the rest validates) before tokenising, so a character and a BPE dataset of one text share a split.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from quill.atomic import atomic_write
from quill.errors import ConfigError
from quill.tokenizer import Tokenizer

META_FILE = "meta.json"
SPLITS = ("train", "val")


def split_text(text: str, val_fraction: float = 0.1) -> tuple[str, str]:
    """The first (1 - val_fraction) of the characters, and the rest."""
    n = int(len(text) * (1 - val_fraction))
    return text[:n], text[n:]


def prepare(text_file: str | Path, out_dir: str | Path, tokenizer: str = "char",
            val_fraction: float = 0.1) -> dict[str, Any]:
    """Tokenise `text_file` into `out_dir` (train.bin, val.bin, tokenizer files, meta.json); returns the meta."""
    if tokenizer not in ("char", "gpt2"):
        raise ConfigError(f"tokenizer must be 'char' or 'gpt2', got {tokenizer!r}", "tokenizer")
    if not 0 < val_fraction < 1:
        raise ConfigError(f"val_fraction must be in (0, 1), got {val_fraction}", "val_fraction")
    text_file, out_dir = Path(text_file), Path(out_dir)
    raw = text_file.read_bytes()
    text = raw.decode("utf-8")
    tok = Tokenizer.characters(text) if tokenizer == "char" else Tokenizer.gpt2()
    if tok.vocab_size > 65536:
        raise ConfigError(f"vocabulary of {tok.vocab_size} does not fit uint16 token files", "tokenizer")
    train_text, val_text = split_text(text, val_fraction)
    if not train_text or not val_text:
        raise ConfigError(f"{text_file} is too short to split", "data")
    out_dir.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split, part in zip(SPLITS, (train_text, val_text)):
        ids = np.asarray(tok.encode(part), dtype=np.uint16)
        counts[split] = int(ids.size)
        atomic_write(out_dir / f"{split}.bin", lambda p, ids=ids: ids.tofile(p))
    tok.save(out_dir)
    meta = {"source": text_file.name, "sha256": hashlib.sha256(raw).hexdigest(), "tokenizer": tokenizer,
            "vocab_size": tok.vocab_size, "val_fraction": val_fraction, "chars": len(text),
            "train_tokens": counts["train"], "val_tokens": counts["val"],
            "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id}
    atomic_write(out_dir / META_FILE, lambda p: p.write_text(json.dumps(meta, indent=2) + "\n"))
    return meta


def read_meta(data_dir: str | Path) -> dict[str, Any]:
    path = Path(data_dir) / META_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{data_dir} is not a prepared dataset (no {META_FILE}); run `quill prepare` first",
                          "data") from None


def load_tokens(data_dir: str | Path, split: str) -> np.ndarray:
    """A read-only memory map of one split's token ids."""
    path = Path(data_dir) / f"{split}.bin"
    if not path.exists():
        raise ConfigError(f"{path} not found; run `quill prepare` first", "data")
    return np.memmap(path, dtype=np.uint16, mode="r")


class BatchSampler:
    """Random (x, y) windows of `block_size` tokens from a token array, drawn from a private generator.

    The generator's state is the sampler's whole position, so `state_dict()` / `load_state_dict()` resume the
    exact sequence of batches; it is independent of the global RNG (dropout), so evaluation never shifts it.
    """

    def __init__(self, tokens: np.ndarray, block_size: int, batch_size: int, seed: int,
                 device: torch.device | str = "cpu"):
        if len(tokens) <= block_size:
            raise ConfigError(f"a split of {len(tokens)} tokens is too short for block_size {block_size}",
                              "block_size")
        self.tokens, self.block_size, self.batch_size = tokens, block_size, batch_size
        self.device = torch.device(device)
        self.generator = torch.Generator().manual_seed(seed)

    def next(self) -> tuple[Tensor, Tensor]:
        starts = torch.randint(len(self.tokens) - self.block_size, (self.batch_size,), generator=self.generator)
        return self._windows(starts.tolist())

    def _windows(self, starts: list[int]) -> tuple[Tensor, Tensor]:
        t = self.block_size
        rows = np.stack([np.asarray(self.tokens[s:s + t + 1], dtype=np.int64) for s in starts])
        xy = torch.from_numpy(rows)
        x, y = xy[:, :-1], xy[:, 1:]
        if self.device.type == "cuda":
            return (x.pin_memory().to(self.device, non_blocking=True),
                    y.pin_memory().to(self.device, non_blocking=True))
        return x.contiguous(), y.contiguous()

    def state_dict(self) -> Tensor:
        return self.generator.get_state()

    def load_state_dict(self, state: Tensor) -> None:
        self.generator.set_state(state)


__all__ = ["prepare", "split_text", "read_meta", "load_tokens", "BatchSampler"]
