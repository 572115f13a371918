"""Decode kernels for x86-64 CPUs with AVX2/FMA: small-batch matrix-vector products and one-query attention.

Why they exist (the measurements are in docs/performance.md): a decode step is a chain of matrix-*vector*
products whose cost is reading the weights once. On AVX2 machines torch's fp32 path (MKL sgemv) reads
weights well below the memory bandwidth, torch's int8 weight-only kernels (`_weight_int8pack_mm`, fbgemm's
dynamic int8) run far below it because their fast paths need AVX-512, and
SDPA's CPU kernel on a slice of the preallocated cache costs far more than the arithmetic. The kernels
here read each weight row once, convert it to fp32 in registers (bf16/fp16/int8 weights) and accumulate
in fp32, so one decode step runs at the memory bound for every weight format.

They are plain C in quill/csrc (no torch headers: builds in about a second), compiled on first use with the
system C compiler into the user cache, once per CPU variant (quill.kernels.cpu: AVX2+FMA, AVX-512 with VNNI,
and with VNNI and BF16; `QUILL_ISA` overrides the choice), and called through ctypes on tensors' data pointers.
This package is the loader and the Python API; quill.kernels.plan describes a model to the fused decode step. Threads come from a
small pool of their own (`torch.get_num_threads()` threads, the caller included) without OpenMP's
barriers, which on a busy shared machine stall for a scheduler tick whenever a helper thread is
descheduled. Anything unsupported (no compiler, not x86-64/AVX2, `QUILL_KERNELS=0`) leaves
`available()` False and the model uses its plain torch path; results agree to float rounding.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import itertools
import logging
import mmap
import os
import subprocess
import threading
import time
from collections.abc import Callable, Collection, Iterable
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from quill.errors import InvalidParameter
from quill.kernels import build, tune
from quill.kernels.cpu import VARIANTS, Variant, choose_variant, this_cpu
from quill.kernels.tune import DEFAULT_ROWS

log = logging.getLogger("quill.kernels")

_ABI = build.constants()
F32, BF16, F16, I8 = _ABI["F32"], _ABI["BF16"], _ABI["F16"], _ABI["I8"]
DTYPE_CODES = {torch.float32: F32, torch.bfloat16: BF16, torch.float16: F16, torch.int8: I8}
FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
ACTIVATIONS = {None: _ABI["ACT_NONE"], "gelu_new": _ABI["ACT_GELU_TANH"], "gelu_pytorch_tanh": _ABI["ACT_GELU_TANH"],
               "gelu": _ABI["ACT_GELU_ERF"], "relu": _ABI["ACT_RELU"]}
U8_MAX_K = _ABI["U8_MAX_K"]  # the longest K gemm_u8i8 sums exactly
MAX_BANS = _ABI["MAX_BANS"]  # banned ids per row that quill_argmax_banned takes

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_variant: Variant | None = None
_error: Exception | None = None  # a QUILL_ISA the CPU cannot honour: raised at every use, never a silent fallback
_why = ""  # why no variant is loaded (for `quill info --system`)
_tried = False


def _switched_off(name: str) -> bool:
    """Whether the environment switch `name` (default on) is set to 0/false/off/no."""
    return os.environ.get(name, "1").lower() in ("0", "false", "off", "no")


def _bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Declare the C entry points' signatures on a freshly loaded library."""
    P, I, C = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.quill_linear.argtypes = [P, C, I, I, P, C, P, P, C, P, P, C, I, I, I, C, P, P, C, ctypes.c_float, C, P]
    lib.quill_linear.restype = C
    lib.quill_rows_u8.argtypes = [I]
    lib.quill_rows_u8.restype = C
    lib.quill_gemm_i8.argtypes = [P, C, I, I, P, P, P, C, P, P, C, I, I, I, C, C]
    lib.quill_gemm_i8.restype = C
    lib.quill_gemm_f32.argtypes = [P, C, I, I, P, C, P, C, P, P, C, I, I, I, C, C]
    lib.quill_gemm_f32.restype = C
    lib.quill_gemm_bf16.argtypes = [P, C, I, I, P, P, C, P, P, C, I, I, I, C, C]
    lib.quill_gemm_bf16.restype = C
    lib.quill_has_gemm_bf16.argtypes = []
    lib.quill_has_gemm_bf16.restype = C
    lib.quill_gemm_u8i8.argtypes = [P, C, I, I, P, P, P, P, C, P, P, C, I, I, I, C, C]
    lib.quill_gemm_u8i8.restype = C
    lib.quill_has_gemm_u8i8.argtypes = []
    lib.quill_has_gemm_u8i8.restype = C
    lib.quill_attn_decode.argtypes = [P, C, I, I, I, I, P, P, C, I, I, I, P, I, ctypes.c_float, P, I, C]
    lib.quill_attn_decode.restype = C
    lib.quill_attn_prefill.argtypes = [P, I, I, I, P, C, I, I, I, P, I, I, I, I, I, I, I, I, ctypes.c_float, P, C]
    lib.quill_attn_prefill.restype = C
    lib.quill_attn_prefill_bf16.argtypes = [P, C, I, I, I, P, I, I, I, P, I, I, I, I, I, I, I, I, ctypes.c_float, P, C, C]
    lib.quill_attn_prefill_bf16.restype = C
    lib.quill_decode_step.argtypes = [P, I, P, P, I, P, P, C, I, I, I, I, P, P, P, P, P, C, C]
    lib.quill_decode_step.restype = C
    lib.quill_decode_greedy.argtypes = [P, I, P, P, I, P, P, C, I, I, I, I, P, P, P, P, P, C, C, I, P, P, P, P, I, I, P, P]
    lib.quill_decode_greedy.restype = I
    lib.quill_activate.argtypes = [P, I, C, C, C]
    lib.quill_activate.restype = None
    lib.quill_layer_norm.argtypes = [P, C, I, P, C, I, I, I, P, P, C, ctypes.c_float, C]
    lib.quill_layer_norm.restype = C
    lib.quill_convert.argtypes = [P, C, P, P, C, P, P, C]
    lib.quill_convert.restype = None
    lib.quill_argmax.argtypes = [P, C, I, I, I, P]
    lib.quill_argmax.restype = None
    lib.quill_argmax_banned.argtypes = [P, C, I, I, I, P, P, P]
    lib.quill_argmax_banned.restype = None
    lib.quill_mask_bits.argtypes = [P, P, I, P, I]
    lib.quill_mask_bits.restype = None
    lib.quill_bits_ids.argtypes = [P, I, P, I]
    lib.quill_bits_ids.restype = I
    lib.quill_argmax_bits.argtypes = [P, P, I, P, I]
    lib.quill_argmax_bits.restype = I
    lib.quill_step_profile.argtypes = [P]
    lib.quill_step_profile.restype = None
    lib.quill_isa.argtypes = []
    lib.quill_isa.restype = ctypes.c_char_p
    return lib


def _load() -> ctypes.CDLL | None:
    """The library of the variant this CPU (or QUILL_ISA) selects, built and loaded on first call; None when
    the kernels cannot serve (switched off, no AVX2, no compiler)."""
    global _lib, _variant, _error, _why, _tried
    with _lock:
        if not _tried:
            _tried = True
            _lib, _variant, _error, _why = None, None, None, ""
            if _switched_off("QUILL_KERNELS"):
                _why = "QUILL_KERNELS=0"
            else:
                try:
                    _variant = choose_variant(this_cpu())
                except InvalidParameter as e:
                    _error = e
                if _variant is None and _error is None:
                    _why = "the CPU lacks AVX2/FMA/F16C"
                    log.info("quill kernels: CPU lacks AVX2/FMA/F16C; using torch kernels")
                elif _variant is not None:
                    try:
                        _lib = _bind(ctypes.CDLL(str(build.build(_variant).path)))
                    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
                        _variant, _why = None, str(e)
                        log.warning("quill kernels unavailable (%s); using torch kernels", e)
        if _error is not None:
            raise _error
        return _lib


def reload() -> None:
    """Choose the variant again at next use (after changing QUILL_ISA or QUILL_KERNELS: tests, benchmarks). The
    loaded library is dropped too: the entry points take `_lib` while it is set, without asking `_load`."""
    global _tried, _lib
    with _lock:
        _tried, _lib = False, None


def variant() -> Variant | None:
    """The kernel variant in use (loading it if need be), or None where the torch path serves."""
    return _variant if _load() is not None else None


def system_report() -> dict[str, object]:
    """The CPU, the SIMD flags the variants look for, and the variant chosen: for `quill info --system` and
    the benchmark's report. Never raises: a bad QUILL_ISA is reported in "error"."""
    cpu = this_cpu()
    wanted = sorted({f for v in VARIANTS.values() for f in v.needs} | {f for f in cpu.flags if f.startswith("avx512")})
    report: dict[str, object] = {
        "cpu": cpu.model, "flags": [f for f in wanted if f in cpu.flags],
        "missing": {v.name: cpu.missing(v) for v in VARIANTS.values()},
        "QUILL_ISA": os.environ.get("QUILL_ISA", "auto"), "variant": None}
    try:
        chosen = variant()
    except InvalidParameter as e:
        report["error"] = str(e)
        return report
    if chosen is None:
        report["reason"] = _why
    else:
        report["variant"] = chosen.name
        report["summary"] = chosen.summary
        report["compiled_for"] = _lib.quill_isa().decode()
    return report


def available() -> bool:
    """Whether the compiled kernels can be used (built on first call).

    Never while torch traces (ONNX export: a ctypes call would be recorded as a constant), compiles (it would
    break the graph) or runs a dispatch mode (FLOP counters, fake tensors must see every op): the torch path is
    what those observe.
    """
    return not observed() and _load() is not None


def observed() -> bool:
    """Whether torch is tracing, compiling or running a dispatch mode: fast paths stand aside then."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling() or is_in_torch_dispatch_mode()


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, scale: Tensor | None = None,
           residual: Tensor | None = None, out: Tensor | None = None, ln: nn.LayerNorm | None = None,
           act: str | None = None, sums: Tensor | None = None) -> Tensor:
    """`(residual +) (ln(x) @ weight.T) * scale + bias` for x [M, K] (last dim contiguous).

    weight: [N, K] contiguous float32/bfloat16/float16/int8; scale: float32 [N] (int8 weights) or None;
    ln: an optional LayerNorm applied to each row of x first (in fp32, fused); the result has x's dtype.
    `out` and `residual` are [M, N] with a contiguous last dim and may be the same tensor (an in-place
    residual add). int8 weights meet each row rounded to int16 (one scale a row), or where the caller gives
    the weight's `sums` (`row_sums`) and `u8_rows(K)` says so to u8 (a scale and a zero point a row, the sums
    taking the zero point off: twice the products an instruction); either way a row's result does not depend
    on the rows beside it.
    """
    lib = _lib if _lib is not None else _load()
    M, K = x.shape
    N = weight.shape[0]
    if out is None:
        out = torch.empty(M, N, dtype=x.dtype)
    rc = lib.quill_linear(
        x.data_ptr(), DTYPE_CODES[x.dtype], M, x.stride(0), weight.data_ptr(), DTYPE_CODES[weight.dtype],
        None if scale is None else scale.data_ptr(),
        None if bias is None else bias.data_ptr(), 0 if bias is None else DTYPE_CODES[bias.dtype],
        None if residual is None else residual.data_ptr(), out.data_ptr(), DTYPE_CODES[out.dtype], out.stride(0),
        N, K, torch.get_num_threads(),
        None if ln is None else ln.weight.data_ptr(), None if ln is None or ln.bias is None else ln.bias.data_ptr(),
        0 if ln is None else DTYPE_CODES[ln.weight.dtype], 0.0 if ln is None else ln.eps, ACTIVATIONS[act],
        None if sums is None else _checked_sums(sums, N).data_ptr())
    if rc:
        raise MemoryError("quill_linear: out of memory")
    return out


BF16_PANEL, BF16_GROUP, BF16_KSTEP = _ABI["BF16_PANEL"], _ABI["BF16_GROUP"], _ABI["BF16_KSTEP"]


def identity(*tensors: Tensor | None) -> tuple:
    """The tensors' identity: a packed copy made from them is remade when it changes."""
    # inference tensors (made under inference_mode) keep no version counter: their pointer identifies them
    return tuple((t.data_ptr(), -1 if t.is_inference() else t._version) for t in tensors if t is not None)


class PackedCopy:
    """A weight in a GEMM's own layout, made on first use and made again when the key it was made for changes
    (the `identity` of what it was made from, and anything else its layout depends on)."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._value: object = None

    @property
    def made(self) -> bool:
        return self._key is not None

    def get(self, key: tuple, make: Callable[[], object]) -> object:
        """The copy for `key`, made by `make()` unless the one kept was made for the same key. A copy made while
        the tuner times its path is dropped again if that path loses (tune.made_while_timing)."""
        if self._key != key:
            self._value, self._key = make(), key
            tune.made_while_timing(self.release)
        return self._value

    def release(self) -> None:
        """Drop the copy (the next `get` makes it again)."""
        self._key, self._value = None, None


def _pack(weight: Tensor, panel: int, group: int, kstep: int) -> Tensor:
    """A weight [N, K] in a GEMM's panels: columns zero-padded to a multiple of panel * group, K to kstep, then
    per panel of `panel` columns each run of `kstep` consecutive K columns with the panel's columns side by
    side: [N / panel, K / kstep, panel, kstep]."""
    n, k = weight.shape
    padded = torch.nn.functional.pad(weight, (0, -k % kstep, 0, -n % (panel * group)))
    np_, kp = padded.shape
    return padded.view(np_ // panel, panel, kp // kstep, kstep).permute(0, 2, 1, 3).contiguous()


def i8_panels() -> tuple[int, int]:
    """(columns a panel, panels a block) of the loaded variant's int8 GEMM (quill.h's QK_I8_*_AVX2 / _AVX512)."""
    family = "AVX512" if variant().name.startswith("avx512") else "AVX2"
    return _ABI[f"I8_PANEL_{family}"], _ABI[f"I8_GROUP_{family}"]


def pack_i8(weight: Tensor) -> Tensor:
    """An int8 weight [N, K] in the panels the loaded variant's `gemm_i8` reads (its own panel width)."""
    return _pack(weight, *i8_panels(), _ABI["I8_KSTEP"])


def pack_bf16(weight: Tensor) -> Tensor:
    """A weight [N, K] as bf16 in the panels `gemm_bf16` reads (quill.h's QK_BF16_*)."""
    return _pack(weight.to(torch.bfloat16), BF16_PANEL, BF16_GROUP, BF16_KSTEP)


def row_sums(weight: Tensor) -> Tensor:
    """An int8 weight's rows' sums (int32 [N]): what u8 rows' zero points take off their products."""
    return weight.sum(1, dtype=torch.int32)


def _checked_sums(sums: Tensor, n: int) -> Tensor:
    if sums.dtype != torch.int32 or sums.shape != (n,) or not sums.is_contiguous():
        raise ValueError(f"row sums must be contiguous int32 [{n}]")
    return sums


def pack_u8i8(weight: Tensor, sums: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """An int8 weight [N, K] as `gemm_u8i8` reads it: its panels (quill.h's QK_U8_*) and its `row_sums` (N padded
    as the panels are; `sums`, where the caller keeps them already)."""
    panels = _pack(weight, _ABI["U8_PANEL"], _ABI["U8_GROUP"], _ABI["U8_KSTEP"])
    sums = row_sums(weight) if sums is None else _checked_sums(sums, weight.shape[0])
    return panels, torch.nn.functional.pad(sums, (0, panels.shape[0] * panels.shape[2] - sums.shape[0]))


def _residual_rows(residual: Tensor | None, x: Tensor, n: int) -> Tensor | None:
    """The residual of a product of x [..., K] with n outputs as contiguous rows [M, n] of x's dtype."""
    if residual is None:
        return None
    if residual.shape != (*x.shape[:-1], n):
        raise ValueError(f"residual of shape {tuple(residual.shape)} for an output of {(*x.shape[:-1], n)}")
    return residual.to(x.dtype).reshape(-1, n).contiguous()


def _gemm(entry: str, x: Tensor, weights: tuple[int, ...], bias: Tensor | None, n: int, act: str | None,
          residual: Tensor | None, what: str) -> Tensor:
    """Call the GEMM entry point `entry` (quill_gemm_*: x's rows, then `weights` (its packed weight's pointers),
    then the bias, residual, output, activation and threads every one of them takes) for x [..., K] with n
    outputs; the result [..., n] in x's dtype. `what` names the GEMM where a variant lacks it."""
    lib = _lib if _lib is not None else _load()
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape[0], n, dtype=x.dtype)
    res = _residual_rows(residual, x, n)
    rc = getattr(lib, entry)(x2.data_ptr(), DTYPE_CODES[x.dtype], x2.shape[0], x2.stride(0), *weights,
                             None if bias is None else bias.data_ptr(), 0 if bias is None else DTYPE_CODES[bias.dtype],
                             None if res is None else res.data_ptr(), out.data_ptr(), DTYPE_CODES[out.dtype], n, n,
                             x2.shape[1], ACTIVATIONS[act], torch.get_num_threads())
    if rc == -2:
        raise RuntimeError(f"{entry}: the {_variant.name} kernels have no {what}")
    if rc == -1:
        raise MemoryError(f"{entry}: out of memory")
    if rc:  # -3: an input the entry does not take (a dtype, a K too long), which its wrapper checks first
        raise ValueError(f"{entry}: inputs it does not take (x {tuple(x.shape)} {x.dtype}; code {rc})")
    return out.view(*x.shape[:-1], n)


def gemm_i8(x: Tensor, packed: Tensor, scale: Tensor, bias: Tensor | None, n: int, act: str | None = None,
            residual: Tensor | None = None) -> Tensor:
    """`(residual +) act((x @ W.T) * scale + bias)` for many rows of x [..., K] (a float dtype; the result has
    it), W int8 [n, K] as `pack_i8(W)` packed it, scale float32 [n]: activations rounded to int16 with one scale a
    row, exact integer products (the decode kernels' accuracy at GEMM speed; docs/performance.md)."""
    if packed.shape[2] != i8_panels()[0]:
        raise ValueError(f"weights packed in panels of {packed.shape[2]} columns; the {_variant.name} kernels read "
                         f"{i8_panels()[0]}: pack them again (pack_i8)")
    return _gemm("quill_gemm_i8", x, (packed.data_ptr(), scale.data_ptr()), bias, n, act, residual, "int8 GEMM")


def gemm_f32(x: Tensor, weight: Tensor, bias: Tensor | None, act: str | None = None,
             residual: Tensor | None = None) -> Tensor:
    """`(residual +) act(x @ W.T + bias)` for many fp32 rows x [..., K], W [N, K] float (fp32, bf16 or fp16, as
    nn.Linear keeps it: no packed copy) on Quill's fp32 GEMM; fp32 sums and output."""
    if x.dtype != torch.float32:
        raise ValueError(f"quill_gemm_f32: activations of dtype {x.dtype}; it takes torch.float32")
    if weight.dtype not in FLOAT_DTYPES or not weight.is_contiguous():
        raise ValueError("quill_gemm_f32: the weight must be a contiguous float tensor")
    return _gemm("quill_gemm_f32", x, (weight.data_ptr(), DTYPE_CODES[weight.dtype]), bias, weight.shape[0], act,
                 residual, "fp32 GEMM")


def has_gemm_bf16() -> bool:
    """Whether the loaded kernel variant has `gemm_bf16` (AVX-512 BF16's vdpbf16ps)."""
    lib = _lib if _lib is not None else _load()
    return lib is not None and bool(lib.quill_has_gemm_bf16())


def gemm_bf16(x: Tensor, packed: Tensor, bias: Tensor | None, n: int, act: str | None = None,
              residual: Tensor | None = None) -> Tensor:
    """`(residual +) act(x @ W.T + bias)` for many rows of x [..., K] (a float dtype; the result has it), W [n, K]
    as `pack_bf16(W)` packed it: activations rounded to bf16 once, sums and output in fp32 (as the row kernels'
    vdpbf16ps path; docs/performance.md). Only where `has_gemm_bf16()`."""
    return _gemm("quill_gemm_bf16", x, (packed.data_ptr(),), bias, n, act, residual, "bf16 GEMM")


def u8_rows(k: int) -> bool:
    """Whether `linear` (with `sums`) rounds rows of k columns that meet int8 weights to u8: the loaded variant has
    VNNI, QUILL_INT8_U8 is not 0, QUILL_INT8_FLOAT is not 1 and k fits the exact sums. The kernels' own answer."""
    lib = _lib if _lib is not None else _load()
    return lib is not None and bool(lib.quill_rows_u8(k))


def has_gemm_u8i8() -> bool:
    """Whether the loaded kernel variant has `gemm_u8i8` (AVX-512 VNNI's vpdpbusd)."""
    lib = _lib if _lib is not None else _load()
    return lib is not None and bool(lib.quill_has_gemm_u8i8())


def gemm_u8i8(x: Tensor, packed: tuple[Tensor, Tensor], scale: Tensor, bias: Tensor | None, n: int,
              act: str | None = None, residual: Tensor | None = None) -> Tensor:
    """`gemm_i8`'s product with the activations rounded to u8 with a scale and a zero point a row (vpdpbusd: twice
    the int16 GEMM's products an instruction, and more rounding: docs/performance.md, "Quality"); W as
    `pack_u8i8(W)` packed it. Only where `has_gemm_u8i8()`, for K up to U8_MAX_K."""
    if x.shape[-1] > U8_MAX_K:
        raise ValueError(f"quill_gemm_u8i8: K = {x.shape[-1]} is too long for exact int32 sums (at most {U8_MAX_K})")
    panels, sums = packed
    return _gemm("quill_gemm_u8i8", x, (panels.data_ptr(), sums.data_ptr(), scale.data_ptr()), bias, n, act,
                 residual, "u8 x int8 GEMM")


def rows(x: Tensor) -> int:
    """Rows of x as a matrix ([..., K] -> [rows, K])."""
    k = x.shape[-1]
    return x.numel() // k if k else 0


def project(x: Tensor, weight: Tensor, bias: Tensor | None = None, scale: Tensor | None = None,
            others: dict[str, Callable[[Tensor, str | None, Tensor | None], Tensor]] | None = None,
            inexact: Collection[str] = (), act: str | None = None, residual: Tensor | None = None,
            sums: Tensor | None = None) -> Tensor | None:
    """`linear` for x of any leading shape ([..., K] -> [..., N]), or None where the kernels do not serve it;
    `act`, `residual` ([..., N]) and `sums` as there; `act` and `residual` are passed on to `others` (called as
    f(x, act, residual)).

    They serve CPU inference inputs with a float activation dtype and a contiguous weight of a known dtype; the
    caller falls back to its torch path otherwise (GPU, autograd, tracing). One row always runs here (reading
    the weight once is the bound); for more rows, `others` (name -> the caller's own implementation: torch's
    GEMM, fbgemm's) compete with the kernel, and the fastest for this shape class on this machine serves
    (quill.kernels.tune; with QUILL_TUNE=0 the kernel up to DEFAULT_ROWS rows, the first of `others` beyond).
    `inexact` names those of `others` that round more than the rest (they win only by tune.INEXACT_MARGIN).
    """
    m = rows(x)
    if (m <= 0 or x.device.type != "cpu" or x.dtype not in FLOAT_DTYPES
            or weight.dtype not in DTYPE_CODES or not weight.is_contiguous()
            or (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)) or not available()):
        return None

    def own() -> Tensor:
        x2 = x.reshape(m, x.shape[-1])
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        return linear(x2, weight, bias, scale, residual=_residual_rows(residual, x, weight.shape[0]),
                      act=act, sums=sums).view(*x.shape[:-1], weight.shape[0])

    if m > 1 and others:
        candidates = {"quill": own, **{name: functools.partial(f, x, act, residual) for name, f in others.items()}}
        epilogue = (f" {act}" if act else "") + (" +residual" if residual is not None else "")
        key = (f"linear w={str(weight.dtype)[6:]} x={str(x.dtype)[6:]} {weight.shape[0]}x{weight.shape[1]} "
               f"rows<={tune.row_class(m)}{epilogue} [{','.join(candidates)}]")
        default = "quill" if m <= DEFAULT_ROWS else next(iter(others))
        path = tune.choose(_variant.name, key, candidates, default, inexact, before=_pool_job)
        if path != "quill":
            return candidates[path]()
    return own()


@functools.cache
def _pool_buffer() -> Tensor:
    """The 2^20 floats _pool_job works on (4 MB), made on its first use."""
    return torch.zeros(1 << 20)


def _pool_job() -> None:
    """About a millisecond of work on Quill's pool (a GELU over 2^20 floats), run before each candidate a product
    times: in a prefill every product follows Quill's kernels (LayerNorm, attention), so a candidate on torch's
    threads starts with them asleep there, and none may start beside torch's workers still spinning after the
    previous candidate's call, which only the tuner's order would put there (docs/performance.md)."""
    activate_(_pool_buffer(), "gelu_new")


def _serves(*ts: Tensor) -> bool:
    """Whether the kernels serve these tensors: float CPU inference tensors, each with a contiguous last dim."""
    return (all(t.device.type == "cpu" and t.dtype in FLOAT_DTYPES and (t.dim() == 0 or t.stride(-1) == 1)
                and not (torch.is_grad_enabled() and t.requires_grad) for t in ts) and available())


def activate_(x: Tensor, act: str) -> bool:
    """Apply activation `act` to x in place with the vectorised kernel; False (x untouched) when it does not serve.

    It serves contiguous fp32/bf16/fp16 CPU inference tensors with an activation it knows, computing in fp32
    (torch's tanh-GELU is a sizeable share of a prefill, and more in bf16: docs/performance.md).
    """
    if act not in ACTIVATIONS or act is None or not x.is_contiguous() or not _serves(x):
        return False
    _lib.quill_activate(x.data_ptr(), x.numel(), DTYPE_CODES[x.dtype], ACTIVATIONS[act], torch.get_num_threads())
    return True


def layer_norm(x: Tensor, weight: Tensor, bias: Tensor | None, eps: float) -> Tensor | None:
    """LayerNorm over x's last dim ([..., K] -> a new tensor of x's dtype), or None where it does not serve.

    It runs on the kernels' own thread pool (torch's LayerNorm, an OpenMP op between two of Quill's kernels,
    waits for a core that the pool's helper still holds: docs/performance.md), computing in fp32 as the fused
    decode step's LayerNorm does; weight and bias: [K] of one float dtype."""
    K = x.shape[-1]
    if (not _serves(*(t for t in (x, weight, bias) if t is not None)) or weight.shape != (K,) or not weight.is_contiguous()
            or (bias is not None and (bias.shape != (K,) or bias.dtype != weight.dtype or not bias.is_contiguous()))):
        return None
    x2 = x.reshape(-1, K)
    y = torch.empty(x2.shape, dtype=x.dtype)
    rc = _lib.quill_layer_norm(x2.data_ptr(), DTYPE_CODES[x.dtype], x2.stride(0), y.data_ptr(), DTYPE_CODES[y.dtype],
                               K, x2.shape[0], K, weight.data_ptr(), bias.data_ptr() if bias is not None else None,
                               DTYPE_CODES[weight.dtype], eps, torch.get_num_threads())
    if rc:
        raise MemoryError("quill_layer_norm: out of memory")
    return y.view(x.shape)


def copy_(dst: Tensor, src: Tensor) -> bool:
    """dst[...] = src, converted to dst's dtype and rounded as torch's cast rounds; False (dst untouched) where it
    does not serve: float CPU tensors of one shape of at most 4 dims, each with a contiguous last dim.

    It runs on the kernels' thread pool, as `layer_norm` does, for the prefill's KV cache writes and reads."""
    if dst.shape != src.shape or dst.dim() > 4 or not _serves(dst, src):
        return False
    shape = (1,) * (4 - dst.dim()) + tuple(dst.shape)
    if 0 in shape:
        return True

    def strides(t: Tensor) -> ctypes.Array:
        return (ctypes.c_int64 * 3)(*((0,) * (4 - t.dim()) + tuple(t.stride()))[:3])

    _lib.quill_convert(src.data_ptr(), DTYPE_CODES[src.dtype], strides(src), dst.data_ptr(), DTYPE_CODES[dst.dtype],
                       strides(dst), (ctypes.c_int64 * 4)(*shape), torch.get_num_threads())
    return True


def attn_decode(qkv: Tensor, k_cache: Tensor, v_cache: Tensor, pos: Tensor | int, n_head: int, scale: float,
                out: Tensor) -> Tensor:
    """Write each row's new key/value (from qkv [B, 3C]) at its position and attend over the row's prefix.

    k_cache, v_cache: [B, H, L, D] with a contiguous last dim (one layer of the KV cache, any float dtype: the
    new key/value is rounded to it); pos: LongTensor [B] (contiguous, CPU) or an int shared by all rows; out: [B, C].
    """
    lib = _lib if _lib is not None else _load()
    B = qkv.shape[0]
    D = k_cache.shape[-1]
    sb, sh, sl, _ = k_cache.stride()
    ragged = isinstance(pos, Tensor)
    rc = lib.quill_attn_decode(
        qkv.data_ptr(), DTYPE_CODES[qkv.dtype], B, n_head, D, qkv.stride(0), k_cache.data_ptr(), v_cache.data_ptr(),
        DTYPE_CODES[k_cache.dtype], sb, sh, sl, pos.data_ptr() if ragged else None, 0 if ragged else pos, scale, out.data_ptr(), out.stride(0),
        torch.get_num_threads())
    if rc:
        raise MemoryError("quill_attn_decode: out of memory")
    return out


def _float(t: Tensor) -> Tensor:
    """t as fp32: itself, or an fp32 copy (made by `copy_`)."""
    if t.dtype == torch.float32:
        return t
    out = torch.empty(t.shape)
    return out if copy_(out, t) else t.float()


def attn_prefill(q: Tensor, k: Tensor, v: Tensor, start: int, scale: float) -> Tensor | None:
    """Causal attention of q's T positions start..start+T-1 over keys 0..start+T-1: [B, T, H, D], or None
    when the kernel does not serve (the caller runs torch's SDPA).

    q: [B, H, T, D]; k, v: [B, H, start+T, D] (views of the cache or of the fused qkv projection), float CPU
    inference tensors with a contiguous last dim and D a multiple of 16. bf16 keys and values (a bf16 or int8
    model's cache) run on vdpbf16ps where the CPU has it (`has_gemm_bf16`): q rounded to bf16, the softmax
    weights too, sums in fp32; the result has q's dtype. Otherwise the result is fp32: fp32 keys give fp32
    scores, bf16/fp16 keys integer ones (queries and keys as int16 with one scale a row, twice the FMA's
    products an instruction); the softmax and its sum over the values are fp32 (bf16/fp16 values upcast first).
    """
    B, H, T, D = q.shape
    if D % 16 or k.shape != (B, H, start + T, D) or v.shape != k.shape or not _serves(q, k, v):
        return None
    if k.dtype == v.dtype == torch.bfloat16 and q.dtype in (torch.float32, torch.bfloat16) and has_gemm_bf16():
        out = torch.empty(B, T, H, D, dtype=q.dtype)
        rc = _lib.quill_attn_prefill_bf16(
            q.data_ptr(), DTYPE_CODES[q.dtype], *q.stride()[:3], k.data_ptr(), *k.stride()[:3], v.data_ptr(),
            *v.stride()[:3], B, H, T, D, start, scale, out.data_ptr(), DTYPE_CODES[out.dtype], torch.get_num_threads())
    else:
        q, v = _float(q), _float(v)
        out = torch.empty(B, T, H, D)
        rc = _lib.quill_attn_prefill(
            q.data_ptr(), *q.stride()[:3], k.data_ptr(), DTYPE_CODES[k.dtype], *k.stride()[:3], v.data_ptr(),
            *v.stride()[:3], B, H, T, D, start, scale, out.data_ptr(), torch.get_num_threads())
    if rc:
        raise MemoryError("quill_attn_prefill: out of memory")
    return out


def decode_step(plan: Tensor, tokens: Tensor, pos: Tensor | int, k_cache: Tensor, v_cache: Tensor,
                ws: dict[str, Tensor], logits: Tensor, threads: int) -> Tensor:
    """One token per row through a whole model described by `plan` (quill.kernels.plan); returns logits.

    tokens: LongTensor [B] (contiguous); pos: LongTensor [B] or an int; k_cache/v_cache: the batch's rows of
    the KV cache, [n_layer, B, H, L, D] with a contiguous last dim, in any float dtype; ws: the step's activation
    buffers.
    """
    lib = _lib if _lib is not None else _load()
    if lib.quill_decode_step(*_step_args(plan, tokens, pos, k_cache, v_cache, ws, logits, threads)):
        raise MemoryError("quill_decode_step: out of memory")
    return logits


def _step_args(plan: Tensor, tokens: Tensor, pos: Tensor | int, k_cache: Tensor, v_cache: Tensor,
               ws: dict[str, Tensor], logits: Tensor, threads: int) -> tuple:
    """The arguments quill_decode_step and quill_decode_greedy begin with, in their order."""
    ragged = isinstance(pos, Tensor)
    _, sb, sh, sl, _ = k_cache.stride()
    return (plan.data_ptr(), tokens.shape[0], tokens.data_ptr(), pos.data_ptr() if ragged else None,
            0 if ragged else pos, k_cache.data_ptr(), v_cache.data_ptr(), DTYPE_CODES[k_cache.dtype],
            k_cache.stride(0), sb, sh, sl, ws["x"].data_ptr(), ws["qkv"].data_ptr(), ws["att"].data_ptr(),
            ws["hidden"].data_ptr(), logits.data_ptr(), DTYPE_CODES[logits.dtype], threads)


class Interrupt:
    """A flag another thread sets to end a `decode_greedy` burst after its current step (a request waits)."""

    def __init__(self) -> None:
        self.word = ctypes.c_int(0)  # the C loop reads it after every step

    def set(self) -> None:
        self.word.value = 1

    def clear(self) -> None:
        self.word.value = 0


def decode_greedy(plan: Tensor, tokens: Tensor, pos: Tensor | int, k_cache: Tensor, v_cache: Tensor,
                  ws: dict[str, Tensor], logits: Tensor, threads: int, chunk: int, banned: list[list[int]],
                  stops: list[list[int]], steps: int, deadline: float,
                  interrupt: Interrupt | None = None) -> list[list[int]]:
    """Up to `steps` greedy decode steps in one call (arguments as `decode_step`; `ws` holds `chunk` rows, and
    each step runs the rows in calls of that many): each row's argmax, its `banned` ids skipped, is fed back in.
    The burst ends after a step where a row chose one of its `stops`, when `interrupt` is set, or once
    `time.monotonic()` passes `deadline`; returns each step's tokens, [steps][B]."""
    lib = _lib if _lib is not None else _load()
    B = tokens.shape[0]
    if any(len(row) > MAX_BANS for row in banned):
        raise ValueError(f"at most {MAX_BANS} banned ids a row")
    ban_off, ban_ids = _id_lists(banned)
    stop_off, stop_ids = _id_lists(stops)
    out = (ctypes.c_int64 * (B * steps))()
    done = lib.quill_decode_greedy(*_step_args(plan, tokens, pos, k_cache, v_cache, ws, logits, threads), chunk,
                                   ban_off, ban_ids, stop_off, stop_ids, steps, int(deadline * 1e9),
                                   ctypes.byref(interrupt.word) if interrupt is not None else None, out)
    if done < 0:
        raise MemoryError("quill_decode_greedy: out of memory")
    return [out[s * B:(s + 1) * B] for s in range(done)]


def _id_lists(rows: list[list[int]]) -> tuple[ctypes.Array, ctypes.Array]:
    """Lists of ids per row as the C side reads them: offsets [len(rows) + 1] into one flat array of ids."""
    offsets = (ctypes.c_int64 * (len(rows) + 1))(0, *itertools.accumulate(map(len, rows)))
    return offsets, (ctypes.c_int64 * max(1, offsets[-1]))(*itertools.chain.from_iterable(rows))


HUGE_PAGE = 2 << 20
_THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def move_to_huge_pages(tensors: Iterable[Tensor], min_bytes: int = 1 << 20) -> int:
    """Move the contiguous CPU tensors of at least `min_bytes` (a model's parameters and buffers) into one
    private anonymous mapping backed by 2 MB pages (transparent huge pages, MADV_HUGEPAGE); returns the bytes
    moved. Each tensor keeps its identity (its `.data` is replaced), so modules and ties are unchanged.

    A decode step streams every weight once, and with 4 KB pages each 4 KB costs a TLB miss and stops the
    hardware prefetcher, so 2 MB pages read a step's matrices faster (docs/performance.md). Nothing moves
    where THP is off, outside Linux, or with `QUILL_HUGE_PAGES=0`.
    """
    if _switched_off("QUILL_HUGE_PAGES") or not hasattr(mmap, "MADV_HUGEPAGE"):
        return 0
    try:
        if "[never]" in _THP_SETTING.read_text():
            return 0
    except OSError:
        return 0
    moving, seen = [], set()
    for t in tensors:
        if id(t) not in seen and t.device.type == "cpu" and t.is_contiguous() and t.nbytes >= min_bytes:
            moving.append(t)
        seen.add(id(t))
    if not moving:
        return 0
    spans = [(t.nbytes + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE for t in moving]
    try:
        area = mmap.mmap(-1, sum(spans) + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        area.madvise(mmap.MADV_HUGEPAGE)  # before the first touch: the copies below fault in 2 MB pages
    except OSError as e:
        log.info("no huge pages for the weights: %s", e)
        return 0
    t0 = time.perf_counter()
    base = torch.frombuffer(area, dtype=torch.uint8)  # keeps `area` alive as long as any view of it
    offset = -base.data_ptr() % HUGE_PAGE
    with torch.no_grad():
        for t, span in zip(moving, spans):
            view = base[offset:offset + t.nbytes].view(t.dtype).view(t.shape)
            view.copy_(t)
            t.data = view
            offset += span
    moved = sum(t.nbytes for t in moving)
    log.info("moved %.0f MB of weights into 2 MB pages in %.2f s", moved / 1e6, time.perf_counter() - t0)
    return moved


@contextlib.contextmanager
def single_threaded(device: torch.device | str = "cpu"):
    """Run torch's CPU ops in the block on the calling thread only (no OpenMP wake-ups), then restore."""
    n = torch.get_num_threads()
    if n == 1 or torch.device(device).type != "cpu":
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


PROFILE_PARTS = ("embedding", "qkv projection (+LayerNorm)", "attention (+cache write)", "attention output projection",
                 "MLP up (+LayerNorm, GELU)", "MLP down", "lm_head (+final LayerNorm)")


def step_profile() -> dict[str, float]:
    """Seconds spent in each part of decode steps since the last call (needs QUILL_PROFILE=1 at first use)."""
    lib = _lib if _lib is not None else _load()
    out = (ctypes.c_int64 * 8)()
    lib.quill_step_profile(out)
    return {name: out[i] / 1e9 for i, name in enumerate(PROFILE_PARTS)}


def argmax_rows(logits: Tensor, banned: list[list[int]] | None = None) -> list[int]:
    """torch.argmax(logits, -1).tolist() for a [M, N] tensor, without waking torch's OpenMP threads on CPU.

    banned: ids per row that may not be chosen (as `index_fill(-inf)` first: EOS with ignore_eos, banned_tokens);
    the logits are left as they were.
    """
    lib = _lib if _lib is not None else _load() if logits.device.type == "cpu" else None
    if (lib is None or logits.dim() != 2 or logits.dtype not in FLOAT_DTYPES or logits.stride(-1) != 1
            or logits.device.type != "cpu"
            or (banned and any(len(row) > MAX_BANS or not all(0 <= i < logits.shape[1] for i in row) for row in banned))):
        with single_threaded(logits.device):
            if banned:
                logits = logits.clone()
                for i, ids in enumerate(banned):
                    logits[i, ids] = float("-inf")
            return logits.argmax(-1).tolist()
    M, N = logits.shape
    out = (ctypes.c_int64 * M)()  # ctypes arrays, not tensors: this runs once per decode step
    if banned and any(banned):
        offsets, ids = _id_lists(banned)
        lib.quill_argmax_banned(logits.data_ptr(), DTYPE_CODES[logits.dtype], M, N, logits.stride(0), out, offsets, ids)
    else:
        lib.quill_argmax(logits.data_ptr(), DTYPE_CODES[logits.dtype], M, N, logits.stride(0), out)
    return list(out)


def _bits_lib(bits: Tensor, nbits: int) -> ctypes.CDLL | None:
    """The library, where the kernels can read `nbits` bits of a token bitmask (a contiguous CPU tensor of any
    integer dtype; bit i of byte i // 8); else None."""
    lib = _lib if _lib is not None else _load()
    if lib is None or bits.device.type != "cpu" or not bits.is_contiguous() or bits.numel() * bits.element_size() * 8 < nbits:
        return None
    return lib


def mask_bits(logits: Tensor, bits: Tensor, nbits: int, out: Tensor) -> Tensor | None:
    """`out` = `logits` (one contiguous fp32 CPU row) with every id whose bit in `bits` is clear, or at or past
    `nbits`, at -inf: a grammar's token bitmask applied in one pass on the calling thread. None where the
    kernels cannot serve; the caller masks with torch."""
    lib = _bits_lib(bits, nbits)
    if (lib is None or logits.device.type != "cpu" or logits.dtype != torch.float32 or not logits.is_contiguous()
            or out.shape != logits.shape or out.dtype != torch.float32 or not out.is_contiguous()):
        return None
    lib.quill_mask_bits(logits.data_ptr(), bits.data_ptr(), nbits, out.data_ptr(), logits.numel())
    return out


def argmax_bits(logits: Tensor, bits: Tensor, nbits: int, banned: Collection[int] = ()) -> int | None:
    """argmax_rows over one fp32 CPU row with every id whose bit in `bits` is clear (or at or past `nbits`),
    and every id in `banned`, left out, without writing the masked row; None when no id left has a logit above
    -inf, or where the kernels cannot serve."""
    lib = _bits_lib(bits, nbits)
    if (lib is None or logits.device.type != "cpu" or logits.dtype != torch.float32 or not logits.is_contiguous()
            or logits.numel() < nbits):
        return None
    ban = (ctypes.c_int64 * len(banned))(*banned)
    best = lib.quill_argmax_bits(logits.data_ptr(), bits.data_ptr(), nbits, ban, len(banned))
    return best if best >= 0 else None


def bits_ids(bits: Tensor, nbits: int, out: Tensor) -> Tensor | None:
    """The ids (ascending) whose bit is set in `bits` (ids below `nbits`), written into `out` (int64; its
    length is the most asked for) and returned as its head; None when there are more, or where the kernels
    cannot serve."""
    lib = _bits_lib(bits, nbits)
    if lib is None or out.dtype != torch.int64 or not out.is_contiguous():
        return None
    count = lib.quill_bits_ids(bits.data_ptr(), nbits, out.data_ptr(), out.numel())
    return out[:count] if count <= out.numel() else None


__all__ = ["available", "observed", "rows", "linear", "identity", "PackedCopy", "i8_panels", "pack_i8", "gemm_i8", "gemm_f32", "pack_bf16", "gemm_bf16", "has_gemm_bf16", "pack_u8i8", "gemm_u8i8", "has_gemm_u8i8", "U8_MAX_K", "project", "activate_", "layer_norm", "copy_", "attn_decode", "attn_prefill", "decode_step", "decode_greedy", "Interrupt", "argmax_rows", "mask_bits", "argmax_bits", "bits_ids", "single_threaded", "DEFAULT_ROWS", "FLOAT_DTYPES", "reload",
           "variant", "system_report"]
