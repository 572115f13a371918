"""GPT-2 in one sitting: the config, the blocks and a preallocated KV cache.

Module names mirror Hugging Face's `GPT2LMHeadModel` (transformer.wte, transformer.h.0.attn.c_attn, ...) so
that the checkpoint mapping in `weights.py` is a rename-free, shape-checked copy. Linear layers are
`nn.Linear`s ([out, in] weights; HF's Conv1D stores [in, out]), which lets `quantize.py` swap them.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from quill import kernels
from quill.kernels import plan
from quill.errors import ConfigError

ACTIVATIONS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
}

_HALF = (torch.bfloat16, torch.float16)


def _cpu_half_gemm(dtype: torch.dtype) -> bool:
    """Whether this CPU has a fast GEMM for bf16/fp16 (oneDNN with AVX-512-BF16/AMX or AVX512-FP16)."""
    if dtype == torch.bfloat16:
        return torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return torch.ops.mkldnn._is_mkldnn_fp16_supported()


# oneDNN's linear op (torch builds with mkldnn, which every x86 wheel is): an fp32 GEMM candidate beside MKL's
_ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
# the activations as oneDNN post-ops (attribute, algorithm): applied as each output block is written
_ONEDNN_ACTIVATIONS = {None: ("none", ""), "gelu_new": ("gelu", "tanh"), "gelu_pytorch_tanh": ("gelu", "tanh"),
                       "gelu": ("gelu", "none"), "relu": ("relu", "")}


def epilogue(y: Tensor, act: str | None, residual: Tensor | None) -> Tensor:
    """`(residual +) act(y)` for a product that did not fuse them (y fresh: activated in place where the
    kernels serve)."""
    if act is not None and not kernels.activate_(y, act):
        y = ACTIVATIONS[act](y)
    return y if residual is None else residual + y


def fused(proj: nn.Module, x: Tensor, act: str | None = None, residual: Tensor | None = None) -> Tensor:
    """`(residual +) act(proj(x))`: fused into the product by Quill's projections (`fuses_epilogue`), as passes
    of their own after any other module (a user's own projection)."""
    if getattr(proj, "fuses_epilogue", False):
        return proj(x, act=act, residual=residual)
    return epilogue(proj(x), act, residual)


class Linear(nn.Linear):
    """nn.Linear with CPU inference fast paths (autograd and other devices use F.linear unchanged).

    - quill.kernels' matrix-vector kernel, which reads the weight once at memory speed: always for one row,
      and for more rows (prompts, batched decode outside the fused step) where it beats the GEMMs (MKL's
      through F.linear; for fp32 oneDNN's; for fp32 activations Quill's fp32 GEMM; for bf16 weights on
      AVX-512 BF16 Quill's bf16 GEMM) on this machine (quill.kernels.tune times them per shape class);
    - longer bf16/fp16 inputs on CPUs without a half GEMM (AVX2), and fp32 inputs against half weights on
      every CPU: computed in fp32. torch's fallback bf16 GEMM is far slower than MKL's fp32 one, and its half
      GEMM rounds the output to half (docs/performance.md); converting the weight costs one pass over it.
    """

    fuses_epilogue = True  # forward takes act and residual (`fused`)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._panels = kernels.PackedCopy()  # the weight in the bf16 GEMM's panels (_panel_gemm)

    def forward(self, x: Tensor, act: str | None = None, residual: Tensor | None = None) -> Tensor:
        """`(residual +) act(x @ W.T + b)`: where a fast path serves, the activation (a name of ACTIVATIONS) and
        the residual add happen as the product writes its output, not as passes of their own over it."""
        w = self.weight
        if x.device.type != "cpu" or (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)):
            return epilogue(F.linear(x, w, self.bias), act, residual)
        # as a candidate against the kernel (several rows), torch computes half weights in fp32 from 2 rows on
        others = {"torch": functools.partial(self._torch_forward, upcast_from=2)}
        if x.dtype == w.dtype == torch.float32 and _ONEDNN_LINEAR:
            others["onednn"] = self._onednn_forward
        if x.dtype == torch.float32 and w.dtype in kernels.FLOAT_DTYPES:
            others["f32gemm"] = self._f32_gemm
        if w.dtype == torch.bfloat16 and x.dtype in (torch.float32, torch.bfloat16) and kernels.has_gemm_bf16():
            others["bf16gemm"] = self._panel_gemm
        y = kernels.project(x, w, self.bias, others=others, act=act, residual=residual)
        return y if y is not None else self._torch_forward(x, act, residual)

    def _onednn_forward(self, x: Tensor, act: str | None = None, residual: Tensor | None = None) -> Tensor:
        """fp32 product on oneDNN's GEMM: F.linear takes MKL's, which oneDNN's JIT kernels beat on some CPUs
        (AVX-512 ones: docs/performance.md), so the tuner times both. The activation or the residual add is
        one of its post-ops."""
        if residual is not None and act is None:
            return torch.ops.mkldnn._linear_pointwise.binary(x, residual.to(x.dtype).contiguous(), self.weight,
                                                             self.bias, "add")
        attr, algorithm = _ONEDNN_ACTIVATIONS[act]
        return epilogue(torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, attr, [], algorithm), None,
                        residual)

    def _f32_gemm(self, x: Tensor, act: str | None = None, residual: Tensor | None = None) -> Tensor:
        """fp32 rows on Quill's fp32 GEMM, which reads the weight in place (half weights widened as it packs
        each task's columns): a candidate beside MKL's and oneDNN's, which scale worse on some CPUs' cores."""
        return kernels.gemm_f32(x, self.weight, self.bias, act, residual)

    def _panel_gemm(self, x: Tensor, act: str | None = None, residual: Tensor | None = None) -> Tensor:
        """bf16 weights against many rows on Quill's bf16 GEMM (rows rounded to bf16 as the kernel's bf16 rows
        are; fp32 sums). The weight is repacked into the GEMM's panels on first use and again when it changes."""
        panels = self._panels.get(kernels.identity(self.weight), lambda: kernels.pack_bf16(self.weight))
        return kernels.gemm_bf16(x, panels, self.bias, self.out_features, act, residual)

    def _torch_forward(self, x: Tensor, act: str | None = None, residual: Tensor | None = None,
                       upcast_from: int = kernels.DEFAULT_ROWS + 1) -> Tensor:
        """The CPU inference product on torch's GEMM; half-precision weights in fp32 from `upcast_from` rows on
        where the CPU has no half GEMM."""
        w = self.weight
        # half weights under fp32 activations (GPT.weights_to) always in fp32: torch's half GEMM would round its
        # output to half as well as its inputs, 3.5 points of top-1 agreement over 512 positions (docs/performance.md)
        if w.dtype in _HALF and (x.dtype != w.dtype or kernels.rows(x) >= upcast_from and not _cpu_half_gemm(w.dtype)):
            bias = None if self.bias is None else self.bias.float()
            y = F.linear(x.float(), w.float(), bias).to(x.dtype)
        else:
            y = F.linear(x, w, self.bias)
        return epilogue(y, act, residual)

    def kernel_args(self) -> tuple[Tensor, None, Tensor | None, None]:
        """(weight, scale, bias, sums) for the fused decode step: float weights need no scale and no row sums."""
        return self.weight, None, self.bias, None


# config.json keys that carry no meaning for inference (bookkeeping, task heads, dropout, tokenizer ids).
_IGNORED_HF_KEYS = {
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "_name_or_path",
    "initializer_range", "use_cache", "n_ctx", "task_specific_params", "summary_type", "summary_use_proj",
    "summary_activation", "summary_proj_to_labels", "summary_first_dropout", "pad_token_id", "id2label",
    "label2id", "output_past", "gradient_checkpointing", "return_dict", "output_hidden_states",
    "output_attentions", "torchscript", "tie_encoder_decoder", "is_decoder", "is_encoder_decoder",
    "chunk_size_feed_forward", "problem_type", "prefix", "finetuning_task", "tokenizer_class",
    "decoder_start_token_id", "sep_token_id", "cross_attention_hidden_size", "pruned_heads",
    "bad_words_ids", "add_cross_attention", "do_sample", "max_length", "min_length", "num_beams",
    "temperature", "top_k", "top_p", "repetition_penalty", "length_penalty", "no_repeat_ngram_size",
    "early_stopping", "num_return_sequences", "quill", "quantization_config",
}
_REQUIRED_HF_KEYS = ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head")


@dataclass(frozen=True)
class GPTConfig:
    """Shape and numerics of a GPT-2 model; field names are those of transformers' `GPT2Config`."""

    vocab_size: int = 50257
    n_positions: int = 1024
    n_embd: int = 768
    n_layer: int = 12
    n_head: int = 12
    n_inner: int | None = None
    activation_function: str = "gelu_new"
    layer_norm_epsilon: float = 1e-5
    tie_word_embeddings: bool = True
    scale_attn_weights: bool = True
    scale_attn_by_inverse_layer_idx: bool = False
    reorder_and_upcast_attn: bool = False
    resid_pdrop: float = 0.0
    embd_pdrop: float = 0.0
    attn_pdrop: float = 0.0
    bos_token_id: int | None = 50256
    eos_token_id: int | list[int] | None = 50256

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"config field {name!r} must be a positive integer, got {value!r}", name)
        if self.n_embd % self.n_head:
            raise ConfigError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})", "n_embd")
        if self.activation_function not in ACTIVATIONS:
            raise ConfigError(
                f"unsupported activation_function {self.activation_function!r} "
                f"(supported: {', '.join(sorted(ACTIVATIONS))})",
                "activation_function",
            )
        if self.n_inner is not None and (not isinstance(self.n_inner, int) or self.n_inner <= 0):
            raise ConfigError(f"config field 'n_inner' must be a positive integer or null, got {self.n_inner!r}",
                              "n_inner")
        if not self.layer_norm_epsilon > 0:
            raise ConfigError("config field 'layer_norm_epsilon' must be positive", "layer_norm_epsilon")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def inner_dim(self) -> int:
        return self.n_inner or 4 * self.n_embd

    @property
    def eos_token_ids(self) -> list[int]:
        eos = self.eos_token_id
        return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> GPTConfig:
        """Validate a transformers `config.json` dict: unknown or unsupported keys are errors naming the key."""
        if cfg.get("model_type", "gpt2") != "gpt2":
            raise ConfigError(f"model_type {cfg.get('model_type')!r} is not supported (only 'gpt2')", "model_type")
        if cfg.get("add_cross_attention"):
            raise ConfigError("add_cross_attention=true is not supported", "add_cross_attention")
        for key in _REQUIRED_HF_KEYS:
            if key not in cfg and not (key == "n_positions" and "n_ctx" in cfg):
                raise ConfigError(f"config.json is missing required key {key!r}", key)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in cfg if k not in fields and k not in _IGNORED_HF_KEYS)
        if unknown:
            raise ConfigError(f"unsupported config key {unknown[0]!r}", unknown[0])
        kwargs = {k: v for k, v in cfg.items() if k in fields}
        kwargs.setdefault("n_positions", cfg.get("n_ctx"))
        return cls(**kwargs)

    def to_hf(self) -> dict[str, Any]:
        """The transformers `config.json` for this model."""
        d = dataclasses.asdict(self)
        d.update(model_type="gpt2", architectures=["GPT2LMHeadModel"], n_ctx=self.n_positions)
        return d

    def num_params(self) -> int:
        """Parameter count, counting a tied embedding/lm_head once."""
        c, v, p, i, n = self.n_embd, self.vocab_size, self.n_positions, self.inner_dim, self.n_layer
        per_block = 2 * 2 * c + (c * 3 * c + 3 * c) + (c * c + c) + (c * i + i) + (i * c + c)
        head = 0 if self.tie_word_embeddings else v * c
        return v * c + p * c + n * per_block + 2 * c + head


class KVCache:
    """Preallocated keys and values, [n_layer, batch, n_head, max_len, head_dim], written in place.

    Each batch row holds one sequence starting at cache index 0; rows may be at different lengths
    (ragged decoding), which the attention mask accounts for.
    """

    def __init__(self, config: GPTConfig, batch: int, max_len: int, dtype: torch.dtype,
                 device: torch.device | str = "cpu"):
        shape = (config.n_layer, batch, config.n_head, max_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @classmethod
    def _wrap(cls, k: Tensor, v: Tensor) -> KVCache:
        cache = cls.__new__(cls)
        cache.k, cache.v = k, v
        return cache

    @property
    def batch(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def rows(self, index: slice | Tensor) -> KVCache:
        """A view (slice) or a copy (index tensor) of some batch rows."""
        return KVCache._wrap(self.k[:, index], self.v[:, index])

    def copy_rows(self, dst: Tensor | slice, src: Tensor | slice) -> None:
        """Overwrite rows `dst` with rows `src` (beam reordering, compaction of finished rows)."""
        self.k[:, dst] = self.k[:, src]
        self.v[:, dst] = self.v[:, src]

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


@dataclass
class Positions:
    """Where the T new tokens of each row go: `start` is an int (all rows alike) or a LongTensor [B]."""

    start: int | Tensor
    length: int  # T, tokens per row in this forward
    span: int | None = None  # fixed cache length to attend over (masked): static shapes, no read of `start`

    @property
    def ragged(self) -> bool:
        return isinstance(self.start, Tensor)

    @property
    def causal_start(self) -> int | None:
        """The start shared by every row when attention is plain causal from there (no span); else None."""
        return None if self.ragged or self.span is not None else self.start

    def end(self) -> int:
        """Cache length the attention must read: the furthest row's last position + 1 (or the fixed span)."""
        if self.span is not None:
            return self.span
        if self.ragged:
            return int(self.start.max()) + self.length
        return self.start + self.length

    def ids(self, device: torch.device) -> Tensor:
        """Absolute positions, [T] (uniform) or [B, T] (ragged)."""
        steps = torch.arange(self.length, device=device)
        return steps + self.start if not self.ragged else self.start[:, None] + steps

    def mask(self, kv_len: int, device: torch.device) -> Tensor | None:
        """Boolean attention mask (True = attend) for keys 0..kv_len-1, or None where none is needed."""
        if self.causal_start is not None and (self.length == 1 or self.start == 0):
            return None  # one query sees every cached key; a fresh prefill is plain causal attention
        q = self.ids(device)  # [T] or [B, T]
        mask = torch.arange(kv_len, device=device) <= q[..., None]  # [T, L] or [B, T, L]
        return mask if not self.ragged else mask[:, None]  # [B, 1, T, L]


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.n_head, self.head_dim = config.n_head, config.head_dim
        self.c_attn = Linear(config.n_embd, 3 * config.n_embd)  # fused q, k, v
        self.c_proj = Linear(config.n_embd, config.n_embd)
        self.resid_dropout = nn.Dropout(config.resid_pdrop)
        self.attn_pdrop = config.attn_pdrop
        scale = 1 / math.sqrt(self.head_dim) if config.scale_attn_weights else 1.0
        if config.scale_attn_by_inverse_layer_idx:
            scale /= layer_idx + 1
        self.scale = scale
        self.upcast = config.reorder_and_upcast_attn

    def forward(self, x: Tensor, pos: Positions | None, k_cache: Tensor | None, v_cache: Tensor | None,
                mask: Tensor | None, residual: Tensor | None = None) -> Tensor:
        """(residual +) attention of x's rows over the cache and themselves."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).view(B, T, 3, self.n_head, self.head_dim).permute(2, 0, 3, 1, 4)  # 3x[B,H,T,D]
        if k_cache is not None:  # the cache may keep its own dtype (GPT.kv_dtype)
            if pos.ragged:  # each row writes at its own position
                rows = torch.arange(B, device=x.device)[:, None]
                cols = pos.ids(x.device)  # [B, T]
                k_cache[rows, :, cols] = k.transpose(1, 2).to(k_cache.dtype)
                v_cache[rows, :, cols] = v.transpose(1, 2).to(v_cache.dtype)
            else:  # a slice's copy converts as it writes (on the kernels' pool where they serve)
                for cache, new in ((k_cache, k), (v_cache, v)):
                    rows = cache[:, :, pos.start:pos.start + T]
                    if not kernels.copy_(rows, new):
                        rows.copy_(new)
            kv_len = pos.end()
            k, v = k_cache[:, :, :kv_len], v_cache[:, :, :kv_len]  # [B, H, L, D] views
        dtype = q.dtype
        start = 0 if pos is None else pos.causal_start
        y = None
        if start is not None and not (self.training and self.attn_pdrop > 0):
            y = kernels.attn_prefill(q, k, v, start, self.scale)  # [B, T, H, D], fp32 or q's dtype
        if y is None:
            if self.upcast:
                q, k, v = q.float(), k.float(), v.float()
            elif k.dtype != q.dtype:  # a cache of its own dtype (GPT.kv_dtype)
                k, v = k.to(q.dtype), v.to(q.dtype)
            causal = mask is None and T > 1
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=causal, scale=self.scale,
                dropout_p=self.attn_pdrop if self.training else 0.0,
            ).transpose(1, 2)  # [B, T, H, D]
        y = y.to(dtype).reshape(B, T, C)
        return residual_projection(self.c_proj, self.resid_dropout, y, residual)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = Linear(config.n_embd, config.inner_dim)
        self.c_proj = Linear(config.inner_dim, config.n_embd)
        self.activation = config.activation_function
        self.dropout = nn.Dropout(config.resid_pdrop)

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        """(residual +) the MLP of x's rows."""
        return residual_projection(self.c_proj, self.dropout, fused(self.c_fc, x, act=self.activation), residual)


def layer_norm(ln: nn.LayerNorm, x: Tensor) -> Tensor:
    """ln(x), on the kernels' own thread pool where they serve it (quill.kernels.layer_norm)."""
    if ln.weight is not None and len(ln.normalized_shape) == 1:
        y = kernels.layer_norm(x, ln.weight, ln.bias, ln.eps)
        if y is not None:
            return y
    return ln(x)


def residual_projection(proj: nn.Module, dropout: nn.Dropout, y: Tensor, residual: Tensor | None) -> Tensor:
    """`residual + dropout(proj(y))`, the residual added as the projection writes its output where no dropout
    stands between them (inference)."""
    if residual is None:
        return dropout(proj(y))
    if dropout.training and dropout.p > 0:
        return residual + dropout(proj(y))
    return fused(proj, y, residual=residual)


class Block(nn.Module):
    def __init__(self, config: GPTConfig, layer_idx: int):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, pos: Positions | None, k_cache: Tensor | None, v_cache: Tensor | None,
                mask: Tensor | None) -> Tensor:
        x = self.attn(layer_norm(self.ln_1, x), pos, k_cache, v_cache, mask, residual=x)
        return self.mlp(layer_norm(self.ln_2, x), residual=x)


class GPT(nn.Module):
    """GPT-2 language model. `forward` runs a full sequence, or T new tokens against a KV cache."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.n_positions, config.n_embd),
            drop=nn.Dropout(config.embd_pdrop),
            h=nn.ModuleList(Block(config, i) for i in range(config.n_layer)),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_epsilon),
        ))
        self.lm_head = Linear(config.n_embd, config.vocab_size, bias=False)
        self.tie_weights()
        self.apply(self._init_weights)

    def tie_weights(self) -> None:
        """Share the token embedding with the output head when the config says so."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.transformer.wte.weight

    def _init_weights(self, module: nn.Module) -> None:
        # GPT-2's initialisation (normal 0.02, zero biases), as in transformers, for training from scratch.
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    # Decode steps (one token per row, CPU, no autograd) run through quill.kernels when they are available;
    # set False to force the plain torch path (torch.compile does, and tests compare the two).
    use_kernels: bool = True
    # On CUDA, generation replays decode steps from captured CUDA graphs (quill.graphs); False: eager steps.
    use_cuda_graphs: bool = True
    # dtype of the KV caches `new_cache` makes; None: the activation dtype. A bf16 cache under fp32
    # activations halves what a decode step reads per cached position (quill.load picks it for int8 models).
    kv_dtype: torch.dtype | None = None

    @property
    def device(self) -> torch.device:
        return self.transformer.wte.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.transformer.ln_f.weight.dtype

    def new_cache(self, batch: int = 1, max_len: int | None = None) -> KVCache:
        """A zeroed KV cache for `batch` sequences of up to `max_len` (default n_positions) tokens: the one
        `recycle_cache` kept, where it has this shape."""
        max_len = min(max_len or self.config.n_positions, self.config.n_positions)
        self._decoder.recheck()  # a new generation: weights may have been replaced since the last one
        dtype = self.kv_dtype or self.dtype
        spare = self.__dict__.pop("_spare_cache", None)
        if spare is not None and spare.k.shape[1::2] == (batch, max_len) and spare.k.dtype == dtype:
            spare.k.zero_()
            spare.v.zero_()
            return spare
        return KVCache(self.config, batch, max_len, dtype, self.device)

    def recycle_cache(self, cache: KVCache) -> None:
        """Keep a CPU cache that nothing uses any more for the next `new_cache` of its shape (one a model).
        Fresh memory costs a page fault each 4 KB at first touch: 4-9 ms of a 512-token prefill
        (docs/performance.md), against well under 1 ms to zero memory already mapped."""
        if cache.k.device.type == "cpu" and cache.k.is_contiguous() and cache.v.is_contiguous():
            self.__dict__["_spare_cache"] = cache

    def forward(self, idx: Tensor, start: int | Tensor = 0, cache: KVCache | None = None,
                last_only: bool = False, span: int | None = None,
                return_hidden: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Logits for tokens `idx` [B, T] placed at positions start..start+T-1 (per row if `start` is [B]).

        With a cache, keys and values of these tokens are written into it and attention reads every cached
        position before them. `last_only` computes the head for the final position only ([B, 1, V]).
        `span` makes the attention read that many cache positions under a mask instead of exactly the
        positions in use: the same result, with shapes that do not change from step to step (CUDA graphs).
        `return_hidden` also returns the final hidden states (after ln_f, [B, T, C]) that contrastive search
        ranks candidates by; the fused decode path never materialises them, so such a step runs in torch.
        """
        B, T = idx.shape
        pos = Positions(start, T, span)
        limit = cache.max_len if cache is not None else self.config.n_positions
        if pos.end() > limit:
            raise ValueError(f"positions up to {pos.end()} exceed the context of {limit} tokens")
        if cache is None and (pos.ragged or pos.start != 0):
            raise ValueError("a forward without a cache must start at position 0")
        fused = T == 1 and cache is not None and self.use_kernels and not return_hidden
        if fused and self._decode_ok(idx, pos, cache):
            try:
                return self._decode(idx, pos, cache)
            except plan.Unsupported:  # a layer the kernels cannot run: redo the step (same cache writes) in torch
                pass
        self._decoder.recheck()  # a prompt (a new generation) or an unfused step: the next fused one checks the plan
        x = self.transformer.wte(idx) + self.transformer.wpe(pos.ids(idx.device))  # [B, T, C]
        x = self.transformer.drop(x)
        mask = pos.mask(pos.end(), idx.device) if cache is not None else None
        for i, block in enumerate(self.transformer.h):
            kc, vc = (cache.k[i], cache.v[i]) if cache is not None else (None, None)
            x = block(x, pos if cache is not None else None, kc, vc, mask)
        hidden = layer_norm(self.transformer.ln_f, x)
        logits = self.lm_head(hidden[:, -1:] if last_only else hidden)  # [B, T or 1, V]
        return (logits, hidden) if return_hidden else logits

    # ---- the decode fast path -----------------------------------------------------------------------------

    def _decode_ok(self, idx: Tensor, pos: Positions, cache: KVCache) -> bool:
        """Whether this one-token-per-row step can run on the fused CPU kernels (else the torch path runs)."""
        if self.training or torch.is_grad_enabled() or idx.device.type != "cpu":
            return False
        if cache.k.dtype not in kernels.FLOAT_DTYPES or cache.k.stride(-1) != 1:
            return False
        if pos.ragged and (pos.start.device.type != "cpu" or pos.start.dtype != torch.long):
            return False
        return kernels.available()

    def _decode(self, idx: Tensor, pos: Positions, cache: KVCache) -> Tensor:
        """One token per row in a single call into quill.kernels: embedding, every block (LayerNorm folded
        into the following projection, residual adds and GELU into the projections' epilogues, the cache
        written inside the attention kernel) and the head. Same result as the torch path up to rounding."""
        start = pos.start.contiguous() if pos.ragged else pos.start
        return self._decoder.step(self, idx[:, 0].contiguous(), start, cache.k, cache.v)[:, None]

    def decode_greedy(self, idx: Tensor, start: int | Tensor, cache: KVCache, banned: list[list[int]],
                      stops: list[list[int]], steps: int, deadline: float,
                      interrupt: kernels.Interrupt | None = None) -> list[list[int]] | None:
        """Up to `steps` greedy decode steps in one call into the fused kernels (`kernels.decode_greedy`): idx
        [B, 1] at positions `start`, each row's argmax (its `banned` ids skipped) fed back in; each step's tokens,
        [steps][B]. None where the fused path cannot run the batch; the caller then steps it with `forward`."""
        B, T = idx.shape
        pos = Positions(start, T)
        if (T != 1 or not self.use_kernels or pos.end() + steps - 1 > cache.max_len
                or any(len(ids) > kernels.MAX_BANS for ids in banned) or not self._decode_ok(idx, pos, cache)):
            return None
        start = pos.start.contiguous() if pos.ragged else pos.start
        try:
            return self._decoder.greedy(self, idx[:, 0].contiguous(), start, cache.k, cache.v, banned, stops, steps,
                                        deadline, interrupt)
        except plan.Unsupported:
            return None

    @property
    def _decoder(self) -> plan.Decoder:
        """The fused decode state (plan, buffers, thread tuners), made on first use."""
        decoder = self.__dict__.get("_decode_state")
        if decoder is None:
            decoder = self.__dict__["_decode_state"] = plan.Decoder()
        return decoder

    def weights_to(self, dtype: torch.dtype) -> GPT:
        """Store the projection matrices and the token embedding in `dtype`, in place; the activations,
        LayerNorms, biases and the position embedding keep the model's dtype.

        bf16 matrices under fp32 activations read as few bytes a decode step as a bf16 model (the kernels
        widen weights to fp32 in registers either way) but keep the residual stream out of bf16's rounding,
        which is what costs a bf16 model its top-1 agreement with fp32 (docs/performance.md, "Quality").
        """
        with torch.no_grad():
            for m in self.modules():
                if isinstance(m, nn.Linear) or m is self.transformer.wte:
                    m.weight.data = m.weight.data.to(dtype)  # .data: a tied head and embedding stay one tensor
        self.forget_decode_plan()
        return self

    def forget_decode_plan(self) -> None:
        """Drop the decode kernels' plan and buffers; call after swapping modules in place (`quantize_model`)."""
        self._decoder.forget()


def compile_model(model: GPT, **options: Any) -> GPT:
    """Run the model's forward through `torch.compile` (dynamic shapes: one graph for every cache length).

    The compiled graph replaces the fused decode kernels (`use_kernels` is switched off: their ctypes calls
    would split the graph); docs/performance.md has what each choice measured.
    """
    model.use_kernels = False
    model.forward = torch.compile(model.forward, dynamic=True, **options)
    return model
