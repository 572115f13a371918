"""CUDA graphs for decode steps: a whole one-token-per-row forward replayed as a single launch.

At batch 1 on a GPU, a GPT-2 decode step is a few hundred small kernels, and launching them from Python costs
more than running them. Capturing the step once (per batch size) and replaying it removes that overhead. A
graph needs fixed shapes and addresses: the attention reads the whole preallocated cache under a mask
(`GPT.forward(..., span=)`), and token ids and positions are copied into the graph's own input buffers.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from quill.model import GPT, KVCache

WARMUP_STEPS = 2  # eager runs on a side stream before capture (cuBLAS and allocator set-up)


def graphs_apply(model: GPT) -> bool:
    """Whether `model`'s decode steps should be captured: on CUDA, unless `model.use_cuda_graphs` is False."""
    return model.device.type == "cuda" and model.use_cuda_graphs


_CUDA_LOCK = threading.RLock()


def cuda_turn(device: torch.device | str) -> contextlib.AbstractContextManager:
    """Quill's CUDA lock when `device` is a GPU, else a no-op context: a plain object rather than a generator-based
    context manager, since it is entered around every decode step, where a generator's set-up is a cost paid
    per token (docs/performance.md).

    A graph capture fails when another thread launches CUDA work meanwhile (the server runs one scheduler
    thread per model, and loads models from the store while serving), so captures, batches' steps and model
    loads take turns. The GPU runs one model's step at a time anyway; what is lost is overlap of host work.
    """
    return _CUDA_LOCK if torch.device(device).type == "cuda" else contextlib.nullcontext()


def takes_cuda_turn(method: Callable) -> Callable:
    """Decorate a method of an object with a `model`: the call runs inside `cuda_turn(self.model.device)`."""

    @functools.wraps(method)
    def wrapper(self, *args: Any, **kwargs: Any) -> Any:
        with cuda_turn(self.model.device):
            return method(self, *args, **kwargs)

    return wrapper


class GraphedStep:
    """A captured decode step over a fixed cache view (its rows, its length); call it once per token."""

    def __init__(self, model: GPT, cache: KVCache, tokens: Tensor, positions: Tensor):
        """Capture with the first real inputs: the warm-up runs write the same keys and values that the step
        itself writes, so capturing in the middle of a generation changes nothing."""
        device = model.device
        self.model, self.cache = model, cache
        self.tokens = tokens.to(device, torch.long).clone()  # [B, 1], the graph's input buffers
        self.positions = positions.to(device, torch.long).clone()  # [B]
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                self._forward()
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):  # callers hold cuda_turn: no other thread of Quill launches work
            self.logits = self._forward()  # [B, V], overwritten by every replay

    def _forward(self) -> Tensor:
        return self.model(self.tokens, self.positions, self.cache, span=self.cache.max_len)[:, -1]

    def __call__(self, tokens: Tensor, positions: Tensor) -> Tensor:
        """Logits [B, V] of the next token of each row (a fresh tensor: the graph's own is reused)."""
        self.tokens.copy_(tokens, non_blocking=True)
        self.positions.copy_(positions, non_blocking=True)
        self.graph.replay()
        return self.logits.clone()
