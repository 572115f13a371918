"""Hugging Face GPT-2 checkpoints in and out: config.json plus safetensors (single or sharded) or pytorch_model.bin.

The mapping is strict: every tensor Quill's model expects must be present with the right shape, nothing
unexpected may be left over, and HF's Conv1D weights ([in, out]) are transposed to nn.Linear's [out, in].
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from quill.atomic import atomic_write
from quill.errors import CheckpointError
from quill.model import GPT, GPTConfig

CONFIG_FILE = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PYTORCH_FILE = "pytorch_model.bin"

# HF Conv1D layers store weights as [in, out]; these name suffixes are transposed on the way in and out.
_CONV1D = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
# Buffers that old GPT-2 checkpoints carry (the causal mask); they hold no learned values.
_BUFFERS = (".attn.bias", ".attn.masked_bias")


def load_config(folder: str | os.PathLike) -> GPTConfig:
    """Read and validate `config.json` from a checkpoint folder."""
    path = Path(folder) / CONFIG_FILE
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} not found: a checkpoint folder needs a config.json", CONFIG_FILE) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON: {e}", CONFIG_FILE) from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} must hold a JSON object", CONFIG_FILE)
    return GPTConfig.from_hf(raw)


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path.name} is truncated or corrupt: {e}", path.name) from None


def read_tensors(folder: str | os.PathLike) -> dict[str, Tensor]:
    """All tensors of a checkpoint folder, by their stored (HF) names."""
    folder = Path(folder)
    if (folder / SAFETENSORS_FILE).exists():
        return _read_safetensors(folder / SAFETENSORS_FILE)
    if (folder / SAFETENSORS_INDEX).exists():
        try:
            index = json.loads((folder / SAFETENSORS_INDEX).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{SAFETENSORS_INDEX} is malformed: {e}", SAFETENSORS_INDEX) from None
        tensors: dict[str, Tensor] = {}
        for shard in sorted(set(index.values())):
            if "/" in shard or "\\" in shard or shard.startswith("."):
                raise CheckpointError(f"{SAFETENSORS_INDEX} names an invalid shard {shard!r}", SAFETENSORS_INDEX)
            if not (folder / shard).exists():
                raise CheckpointError(f"shard {shard} listed in {SAFETENSORS_INDEX} is missing", shard)
            tensors.update(_read_safetensors(folder / shard))
        missing = sorted(set(index) - set(tensors))
        if missing:
            raise CheckpointError(f"tensor {missing[0]!r} listed in {SAFETENSORS_INDEX} is in no shard",
                                  SAFETENSORS_INDEX)
        return tensors
    if (folder / PYTORCH_FILE).exists():
        try:
            sd = torch.load(folder / PYTORCH_FILE, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for truncated zips and refused pickles
            raise CheckpointError(f"{PYTORCH_FILE} is truncated, corrupt or not a plain tensor file: {e}",
                                  PYTORCH_FILE) from None
        if not isinstance(sd, dict) or not all(isinstance(v, Tensor) for v in sd.values()):
            raise CheckpointError(f"{PYTORCH_FILE} does not hold a dict of tensors", PYTORCH_FILE)
        return sd
    raise CheckpointError(
        f"no weights in {folder}: expected {SAFETENSORS_FILE}, {SAFETENSORS_INDEX} or {PYTORCH_FILE}",
        SAFETENSORS_FILE)


def hf_to_quill(tensors: dict[str, Tensor], model: GPT) -> dict[str, Tensor]:
    """Map HF tensor names and layouts onto `model`'s state dict, checking every name and shape."""
    expected = {name: p.shape for name, p in model.state_dict().items()}
    tied = model.config.tie_word_embeddings
    if tied:
        expected.pop("lm_head.weight")
    out: dict[str, Tensor] = {}
    for name, t in tensors.items():
        key = name if name.startswith(("transformer.", "lm_head.")) else f"transformer.{name}"
        if key.endswith(_BUFFERS):
            continue
        if key == "lm_head.weight" and tied:
            continue  # a tied head saved explicitly is the embedding again
        if key not in expected:
            raise CheckpointError(f"unexpected tensor {name!r} in checkpoint")
        if key.endswith(_CONV1D):
            t = t.t()
        if t.shape != expected[key]:
            raise CheckpointError(
                f"tensor {name!r} has shape {tuple(t.shape)}, expected {tuple(expected[key])} for this config")
        out[key] = t
    missing = sorted(set(expected) - set(out))
    if missing:
        raise CheckpointError(f"tensor {missing[0]!r} is missing from the checkpoint")
    return out


def quill_to_hf(model: GPT) -> dict[str, Tensor]:
    """The model's tensors under HF names and layouts (the tied head is left out, as transformers does)."""
    out = {}
    for key, t in model.state_dict().items():
        if key == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        out[key] = (t.t() if key.endswith(_CONV1D) else t).contiguous()
    return out


def load_model(folder: str | os.PathLike, dtype: torch.dtype = torch.float32,
               device: torch.device | str = "cpu") -> GPT:
    """Build a GPT from a HF checkpoint folder, in `dtype` on `device`, in eval mode."""
    config = load_config(folder)
    tensors = read_tensors(folder)
    with torch.device("meta"):
        model = GPT(config)
    state = hf_to_quill(tensors, model)
    for key, t in state.items():
        if not t.is_floating_point():
            raise CheckpointError(f"tensor {key!r} has dtype {t.dtype}, expected a floating-point type")
        state[key] = t.to(device=device, dtype=dtype).contiguous()  # Conv1D transposes are views until here
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    if not model.config.tie_word_embeddings and "lm_head.weight" not in state:
        raise CheckpointError("tensor 'lm_head.weight' is missing from the checkpoint")
    return model.eval()


def save_model(model: GPT, folder: str | os.PathLike) -> None:
    """Write config.json and model.safetensors that `transformers.AutoModelForCausalLM` loads unchanged."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config.to_hf()
    config["torch_dtype"] = str(model.dtype).removeprefix("torch.")
    tensors = quill_to_hf(model)
    atomic_write(folder / SAFETENSORS_FILE,
                 lambda p: save_file({k: v.cpu() for k, v in tensors.items()}, p, metadata={"format": "pt"}))
    atomic_write(folder / CONFIG_FILE, lambda p: p.write_text(json.dumps(config, indent=2) + "\n"))


__all__ = ["load_config", "read_tensors", "hf_to_quill", "quill_to_hf", "load_model", "save_model"]
