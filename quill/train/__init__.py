"""Training: dataset preparation, the training loop, checkpoints, DDP and export (see docs/training.md)."""

from quill.train.config import PRESETS, TrainConfig, build_config
from quill.train.data import prepare
from quill.train.trainer import Trainer, train

__all__ = ["TrainConfig", "PRESETS", "build_config", "prepare", "Trainer", "train"]
