"""Quill: GPT-2-family language models, fast on an ordinary CPU (and a GPU when there is one)."""

from quill.openmp import shorten_spin

shorten_spin()  # before anything imports torch

from quill.engine import Completion, Engine, Score, load
from quill.model import GPT, GPTConfig

__all__ = ["load", "Engine", "Completion", "Score", "GPT", "GPTConfig"]
__version__ = "0.1.0"
