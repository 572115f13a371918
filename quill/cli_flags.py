"""Flags that commands of several modules share (`quill generate` in cli.py, `quill serve` in server/cli.py):
defined once here, below both, so that neither command module imports the other."""

from __future__ import annotations

import argparse

MODEL_HELP = ("checkpoint folder, a bundled or stored model's name, or a Hugging Face repo (org/name[@revision], "
              "gpt2, gpt2-medium, ...: downloaded on first use); docs/models.md")
KV_CACHE_HELP = "KV cache dtype: float32, bfloat16 or float16 (default: the model's; bfloat16 for int8 models)"


def add_load_flags(p: argparse.ArgumentParser, what: str = "model") -> None:
    """How to load `what` (the model, or the models): --dtype, --device, --compile, --kv-cache."""
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 (default float32)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--compile", action="store_true", help=f"run the {what} through torch.compile (docs/performance.md)")
    p.add_argument("--kv-cache", default=None, metavar="DTYPE", help=KV_CACHE_HELP)
