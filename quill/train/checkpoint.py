"""Training checkpoints (atomic, `weights_only`-loadable) and export to a Hugging Face GPT-2 folder.

A checkpoint (`ckpt.pt`) holds everything an exact resume needs: model and optimiser state, the GradScaler, the
step, the best val loss, the loss history, and per process the RNG states of torch (CPU and CUDA), numpy and
Python plus the batch sampler's generator. Every value is a tensor or a plain Python type, so
`torch.load(..., weights_only=True)` reads it without unpickling code. `best.pt` holds only the model weights of
the best validation loss so far, which is what `export` writes out by default.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from quill.atomic import atomic_write
from quill.errors import CheckpointError
from quill.model import GPT, GPTConfig
from quill.weights import save_model

CKPT_FILE = "ckpt.pt"
BEST_FILE = "best.pt"


def rng_state(sampler_state: torch.Tensor | None = None) -> dict[str, Any]:
    """This process's RNG states as tensors and plain types."""
    np_state = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": {"version": py_version, "state": list(py_state), "gauss_next": py_gauss},
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    if sampler_state is not None:
        state["sampler"] = sampler_state
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss_next"]))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(path: Path, payload: dict[str, Any]) -> None:
    atomic_write(Path(path), lambda p: torch.save(payload, p))


def load(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} not found", path.name)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zips and refused pickles raise many types
        raise CheckpointError(f"{path} is not a readable training checkpoint: {e}", path.name) from None


def model_from_checkpoint(ckpt: dict[str, Any]) -> GPT:
    """The GPT a checkpoint (`ckpt.pt` or `best.pt`) describes, with its weights, in eval mode."""
    try:
        config = GPTConfig(**ckpt["model_config"])
        state = ckpt["model"]
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"not a Quill training checkpoint (missing {e})") from None
    model = GPT(config)
    model.load_state_dict(state)
    return model.eval()


def export(checkpoint: str | Path, out_dir: str | Path, data_dir: str | Path | None = None,
           dtype: torch.dtype = torch.float32) -> GPT:
    """Write a checkpoint's model as config.json + model.safetensors (+ the dataset's tokenizer) into `out_dir`.

    `checkpoint` is a .pt file or a training out_dir (then best.pt if present, else ckpt.pt). The result loads with
    `quill.weights.load_model` and with transformers' `AutoModelForCausalLM` / `AutoTokenizer`.
    """
    from quill.tokenizer import Tokenizer

    path = Path(checkpoint)
    if path.is_dir():
        path = path / BEST_FILE if (path / BEST_FILE).exists() else path / CKPT_FILE
    ckpt = load(path)
    model = model_from_checkpoint(ckpt).to(dtype)
    save_model(model, out_dir)
    data_dir = data_dir or ckpt.get("train_config", {}).get("data")
    if data_dir and (Path(data_dir) / "tokenizer.json").exists():
        Tokenizer.load(data_dir).save(out_dir)
    return model


__all__ = ["rng_state", "set_rng_state", "save", "load", "model_from_checkpoint", "export", "CKPT_FILE",
           "BEST_FILE"]
