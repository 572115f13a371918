"""Training hyper-parameters: one typed dataclass, named presets, and JSON/TOML config files (parsed, never executed).

Precedence when building a run's configuration: explicit command-line flags > `--config FILE` > `--preset NAME` >
the dataclass defaults. Every value is checked (type and range) when the config is built, so a typo in a file or a
flag fails before any data is read, naming the offending field.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quill.errors import ConfigError

DTYPES = ("float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that determines a training run. Field docs double as `--help` text (see `FIELD_HELP`)."""

    # data and output
    data: str = ""                      # prepared dataset folder (from `prepare`): train.bin, val.bin, tokenizer
    out_dir: str = "out"                # checkpoints, log.json, loss.png
    init_from: str = "scratch"          # scratch | resume | a Hugging Face GPT-2 folder to fine-tune
    # model (ignored when resuming or fine-tuning: the checkpoint's shape is used)
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 128               # context length (n_positions of the exported model)
    dropout: float = 0.0                # residual and embedding dropout
    attn_dropout: float = 0.0           # attention dropout (slows CPU attention noticeably)
    # optimisation
    batch_size: int = 16                # sequences per micro-batch (per process)
    grad_accum: int = 1                 # micro-batches per optimiser step (per process)
    max_iters: int = 1000               # optimiser steps
    learning_rate: float = 1e-3         # peak learning rate
    min_lr: float = 1e-4                # floor of the cosine decay
    warmup_iters: int = 100             # linear warm-up steps
    lr_decay_iters: int | None = None   # end of the cosine decay (default: max_iters)
    decay_lr: bool = True               # False: constant learning_rate after warm-up
    weight_decay: float = 0.1           # applied to 2-D weights (matmuls, embeddings) only
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0              # max global gradient norm; 0 disables clipping
    # evaluation, logging, checkpoints
    eval_interval: int = 250            # steps between train/val evaluations (and checkpoints)
    eval_iters: int = 50                # batches per split per evaluation
    log_interval: int = 10              # steps between log lines
    always_save_checkpoint: bool = True  # checkpoint at every evaluation, not only when val loss improves
    checkpoint_interval: int | None = None  # also checkpoint (without evaluating) every this many steps
    target_val_loss: float | None = None  # stop early once val loss reaches this
    max_minutes: float | None = None    # stop (with a checkpoint) at the first evaluation past this wall time
    # system
    seed: int = 1337
    device: str = "auto"                # auto | cpu | cuda
    dtype: str = "float32"              # float32 | bfloat16 (autocast) | float16 (autocast + GradScaler, CUDA)
    compile: bool = False               # torch.compile the model
    threads: int | None = None          # intra-op CPU threads (default: CPU cores / local processes)
    progress: bool | None = None        # tqdm progress bar (default: when stderr is a terminal)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            _check_type(f.name, getattr(self, f.name), _field_types()[f.name])
        positive = ("n_layer", "n_head", "n_embd", "block_size", "batch_size", "grad_accum", "eval_interval",
                    "eval_iters", "log_interval")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}", name)
        for name in ("max_iters", "warmup_iters", "weight_decay", "grad_clip", "min_lr"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative, got {getattr(self, name)}", name)
        if not self.learning_rate > 0:
            raise ConfigError("learning_rate must be positive", "learning_rate")
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})", "n_embd")
        for name in ("dropout", "attn_dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}", name)
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"{name} must be in [0, 1), got {getattr(self, name)}", name)
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}", "dtype")
        if self.device not in DEVICES and not self.device.startswith("cuda:"):
            raise ConfigError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}", "device")
        if self.threads is not None and self.threads <= 0:
            raise ConfigError("threads must be positive", "threads")
        if self.checkpoint_interval is not None and self.checkpoint_interval <= 0:
            raise ConfigError("checkpoint_interval must be positive", "checkpoint_interval")
        if self.lr_decay_iters is not None and self.lr_decay_iters < 0:
            raise ConfigError("lr_decay_iters must not be negative", "lr_decay_iters")

    @property
    def decay_iters(self) -> int:
        return self.max_iters if self.lr_decay_iters is None else self.lr_decay_iters

    def replace(self, **changes: Any) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Named starting points. `shakespeare-char` is the recipe of the bundled model (quill/models/shakespeare).
PRESETS: dict[str, dict[str, Any]] = {
    # a few-second smoke run: tiny model, short schedule
    "tiny": dict(n_layer=2, n_head=2, n_embd=64, block_size=64, batch_size=16, max_iters=200, learning_rate=3e-3,
                 min_lr=3e-4, warmup_iters=20, eval_interval=50, eval_iters=10, log_interval=10, dropout=0.0),
    # the bundled character-level model: sized for ~90 min on 2 quiet CPU cores (quill/models/shakespeare/README.md)
    "shakespeare-char": dict(n_layer=6, n_head=6, n_embd=192, block_size=256, dropout=0.1, attn_dropout=0.0,
                             batch_size=16, grad_accum=1, max_iters=5000, learning_rate=2e-3, min_lr=1e-4,
                             warmup_iters=150, weight_decay=0.1, beta2=0.99, grad_clip=1.0, eval_interval=250,
                             eval_iters=20, checkpoint_interval=25, log_interval=10, max_minutes=110.0),
    # nanoGPT's "baby GPT" for a GPU: 10.7M parameters, 5000 steps of 64 x 256 tokens
    "shakespeare-char-gpu": dict(n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.2, batch_size=64,
                                 max_iters=5000, learning_rate=1e-3, min_lr=1e-4, warmup_iters=100, beta2=0.99,
                                 eval_interval=250, eval_iters=200, device="auto"),
    # GPT-2 small (124M) on OpenWebText-scale data: ~0.5M tokens per step with 8 processes
    "gpt2-124m": dict(n_layer=12, n_head=12, n_embd=768, block_size=1024, dropout=0.0, batch_size=12,
                      grad_accum=40, max_iters=600000, learning_rate=6e-4, min_lr=6e-5, warmup_iters=2000,
                      weight_decay=0.1, beta1=0.9, beta2=0.95, grad_clip=1.0, eval_interval=1000, eval_iters=200,
                      log_interval=10, dtype="bfloat16"),
}


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _check_type(name: str, value: Any, tp: Any) -> None:
    allowed = typing.get_args(tp) if isinstance(tp, types.UnionType) else (tp,)
    for t in allowed:
        if t is type(None) and value is None:
            return
        if t is bool and isinstance(value, bool):
            return
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return
        if t is str and isinstance(value, str):
            return
    names = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
    raise ConfigError(f"config field {name!r} must be {names}, got {value!r}", name)


def _normalise(values: dict[str, Any], source: str) -> dict[str, Any]:
    """Check keys (dashes allowed for underscores) and coerce ints given for float fields."""
    types_ = _field_types()
    out: dict[str, Any] = {}
    for key, value in values.items():
        name = key.replace("-", "_")
        if name not in types_:
            raise ConfigError(f"{source}: unknown training option {key!r}", key)
        _check_type(name, value, types_[name])
        allowed = typing.get_args(types_[name]) or (types_[name],)
        if float in allowed and isinstance(value, int):
            value = float(value)
        out[name] = value
    return out


def load_file(path: str | Path) -> dict[str, Any]:
    """Options from a JSON or TOML file (by extension; TOML may group keys in tables, which are flattened)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot read config file {path}: {e.strerror or e}", "config") from None
    try:
        if path.suffix.lower() == ".toml":
            raw = tomllib.loads(text)
        elif path.suffix.lower() == ".json":
            raw = json.loads(text)
        else:
            raise ConfigError(f"config file {path} must end in .json or .toml", "config")
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"config file {path} is malformed: {e}", "config") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold an object/table of options", "config")
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(value, dict):  # TOML tables such as [model] / [optim] only group keys
            flat.update(value)
        else:
            flat[key] = value
    return _normalise(flat, str(path))


def build_config(preset: str | None = None, file: str | Path | None = None,
                 overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Defaults < preset < file < overrides (e.g. explicit command-line flags)."""
    values: dict[str, Any] = {}
    if preset is not None:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r} (choose from {', '.join(PRESETS)})", "preset")
        values.update(PRESETS[preset])
    if file is not None:
        values.update(load_file(file))
    if overrides:
        values.update(_normalise(overrides, "options"))
    return TrainConfig(**values)


__all__ = ["TrainConfig", "PRESETS", "build_config", "load_file", "DTYPES"]
