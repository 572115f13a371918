"""The fast paths against the plain torch path: fused decode kernels, bf16, batched decoding, torch.compile.

Tolerances are relative to the largest logit magnitude (`rel_err`):
- fp32 kernels vs torch: 1e-5. Both accumulate in fp32; only the summation order differs (~1e-7 per op).
- bf16 vs fp32: 5e-2. bf16 keeps 8 significant bits, so every rounded activation carries up to 2^-9 (0.2%)
  relative error; a few dozen roundings through LayerNorm, attention and the MLP of a random tiny model
  (initialiser std 0.2, so large activations) add up to a few percent of the largest logit. Greedy tokens
  are not compared in bf16 (near-ties legitimately flip).
- bf16 kernels vs bf16 torch: 5e-2 as well: the kernels keep fp32 between fused ops where torch rounds
  to bf16, so they are closer to fp32 than torch's bf16 path, not bit-equal to it.
"""

from __future__ import annotations

import ctypes
import functools
import dataclasses
import itertools
from pathlib import Path

import numpy
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from quill import generate, kernels
from quill.kernels import build, plan
from quill.kernels.cpu import AVX2
from quill.generate import DecodeBatch, GenerationRequest, Sequence
from quill.model import GPT, GPTConfig, compile_model
from quill.sampling import SamplingParams
from quill.tokenizer import Tokenizer

def needs_kernels(test):
    """Run `test` once per kernel variant this CPU has (the kernel_isa fixture); skip it without the kernels."""
    skip = pytest.mark.skipif(not kernels.available(), reason="quill kernels unavailable (no AVX2 or no C compiler)")
    return pytest.mark.usefixtures("kernel_isa")(skip(test))


CONFIGS = {
    "odd": GPTConfig(vocab_size=101, n_positions=40, n_embd=48, n_head=3, n_layer=2),
    "relu-scaled-inner": GPTConfig(vocab_size=77, n_positions=48, n_embd=36, n_head=2, n_layer=2,
                                   activation_function="relu", scale_attn_by_inverse_layer_idx=True, n_inner=84),
    "untied-gelu-upcast": GPTConfig(vocab_size=90, n_positions=32, n_embd=40, n_head=5, n_layer=2,
                                    activation_function="gelu", scale_attn_weights=False,
                                    reorder_and_upcast_attn=True, layer_norm_epsilon=1e-3,
                                    tie_word_embeddings=False),
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).abs().max() / a.abs().max())


def make_model(cfg: GPTConfig, dtype=torch.float32, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") and "ln" not in name:
                p.normal_(0, 0.05)
            elif "ln" in name:
                p.normal_(1.0 if name.endswith("weight") else 0.0, 0.1)
            else:
                p.normal_(0, 0.2)
    return model.to(dtype)


def decode_both(model: GPT, prompt: torch.Tensor, starts, token: torch.Tensor):
    """One decode step after a prefill, on the kernels and on the torch path; returns (torch, kernels, caches)."""
    out, caches = [], []
    for use in (False, True):
        model.use_kernels = use
        cache = model.new_cache(prompt.shape[0])
        with torch.inference_mode():
            model(prompt, 0, cache)
            out.append(model(token, starts, cache))
        caches.append(cache)
    model.use_kernels = True
    return out[0], out[1], caches


@needs_kernels
@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("dtype,kv_dtype", [(torch.float32, None), (torch.bfloat16, None),
                                            (torch.float32, torch.bfloat16)])
def test_decode_kernels_match_torch_path(name, dtype, kv_dtype):
    """Also with a bf16 cache under fp32 activations (GPT.kv_dtype): both paths round each key/value to bf16
    once, and the kernels' prefill attention over a bf16 cache (vdpbf16ps, where the CPU has it) rounds the
    queries and the softmax weights to bf16 as well, so the paths differ by bf16 roundings: 1e-2 (measured
    up to 4.1e-3 on these models), as the bf16 cache does against the fp32 one."""
    cfg = CONFIGS[name]
    model = make_model(cfg, dtype)
    model.kv_dtype = kv_dtype
    prompt = torch.randint(0, cfg.vocab_size, (3, 9))
    tol = 5e-2 if dtype == torch.bfloat16 else 1e-5 if kv_dtype is None else 1e-2
    # ragged rows (each at its own position) and a shared int position
    for starts in (torch.tensor([8, 3, 5]), 9):
        token = torch.randint(0, cfg.vocab_size, (3, 1))
        ref, fast, (c_ref, c_fast) = decode_both(model, prompt, starts, token)
        assert fast.shape == ref.shape == (3, 1, cfg.vocab_size) and fast.dtype == ref.dtype == dtype
        assert c_ref.k.dtype == c_fast.k.dtype == (kv_dtype or dtype)
        assert rel_err(ref, fast) <= tol, (name, dtype, starts)
        assert rel_err(c_ref.k, c_fast.k) <= tol and rel_err(c_ref.v, c_fast.v) <= tol
        if kv_dtype is not None:
            model.kv_dtype = None
            exact, _, _ = decode_both(model, prompt, starts, token)
            model.kv_dtype = kv_dtype
            assert rel_err(exact, fast) <= 1e-2


@needs_kernels
def test_decode_kernels_fall_back_for_unknown_modules():
    """A projection the kernels do not know (a subclass with its own forward) sends the step to torch."""
    cfg = CONFIGS["odd"]
    model = make_model(cfg)

    class Doubled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    old = model.transformer.h[1].mlp.c_fc
    new = Doubled(old.in_features, old.out_features)
    new.load_state_dict(old.state_dict())
    model.transformer.h[1].mlp.c_fc = new
    prompt = torch.randint(0, cfg.vocab_size, (2, 5))
    ref, fast, _ = decode_both(model, prompt, 5, torch.randint(0, cfg.vocab_size, (2, 1)))
    assert rel_err(ref, fast) <= 1e-5


def test_thread_tuner_rechecks_a_clearly_slower_choice_less_and_less_often():
    """Steps on two threads take 1 ms, on one 2 ms: the tuner keeps two and re-checks one at doubling
    intervals up to PROBE_MAX. When one thread becomes the faster it switches: at once when the choice in
    use slows down, within a few re-checks when the other one speeds up."""
    from quill.kernels.plan import ThreadTuner

    tuner, cost, picks = ThreadTuner(2), {1: 2e-3, 2: 1e-3}, []

    def run(steps: int) -> list[int]:
        out = []
        for _ in range(steps):
            c = tuner.choose(1)
            tuner.record(1, c, cost[c])
            out.append(c)
        picks.extend(out)
        return out

    run(3000)
    assert picks[:6] == [1, 1, 1, 2, 2, 2]  # the warm-up
    probes = [i for i, c in enumerate(picks) if c == 1][3:]
    gaps = [b - a for a, b in zip(probes, probes[1:])]
    p = ThreadTuner.PROBE_EVERY
    assert probes[0] == 6 + p and gaps[:3] == [2 * p, 4 * p, ThreadTuner.PROBE_MAX]
    assert set(gaps[3:]) == {ThreadTuner.PROBE_MAX}
    cost[2] = 3e-3  # the machine got busy: two threads now slower than one
    assert run(24)[-8:] == [1] * 8
    cost[2], cost[1] = 1e-3, 2e-3  # back to the start
    run(ThreadTuner.PROBE_MAX + 4 * p)
    cost[1] = 0.5e-3  # one thread got faster, the choice in use did not change
    after = run(ThreadTuner.PROBE_MAX + 4 * p)
    assert after[-8:] == [1] * 8


@needs_kernels
def test_weights_replaced_between_generations_are_decoded_with():
    """The fused steps check the plan's weight addresses once a generation (a new cache, a prompt), not every
    step: weight data replaced after a generation (`param.data = ...`, `model.to`) is what the next one uses."""
    cfg = CONFIGS["odd"]
    model, other = make_model(cfg), make_model(cfg, seed=1)
    prompt, token = torch.randint(0, cfg.vocab_size, (2, 5)), torch.randint(0, cfg.vocab_size, (2, 1))

    def generation(m: GPT) -> torch.Tensor:
        with torch.inference_mode():
            cache = m.new_cache(2)
            m(prompt, 0, cache)
            m(token, 5, cache)
            return m(token, 6, cache)

    generation(model)  # builds the plan over the first weights
    for mine, theirs in zip(model.parameters(), other.parameters()):
        mine.data = theirs.data.clone()
    assert torch.equal(generation(model), generation(other))
    model.to(torch.bfloat16)
    other.to(torch.bfloat16)
    assert torch.equal(generation(model), generation(other))


@needs_kernels
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16, torch.float16, torch.int8])
@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16])
def test_linear_kernel_matches_torch(wdtype, xdtype):
    torch.manual_seed(0)
    for m, n, k in [(1, 37, 45), (2, 130, 64), (5, 9, 300), (kernels.DEFAULT_ROWS, 64, 24)]:
        x = torch.randn(m, k).to(xdtype)
        w = torch.randn(n, k)
        scale = None
        if wdtype == torch.int8:
            scale = torch.rand(n) + 0.5
            w = torch.randint(-127, 128, (n, k)).to(torch.int8)
            dense = w.float() * scale[:, None]
        else:
            w = w.to(wdtype)
            dense = w.float()
        bias, residual = torch.randn(n).to(xdtype), torch.randn(m, n).to(xdtype)
        ref = residual.float() + x.float() @ dense.t() + bias.float()
        sums = kernels.row_sums(w) if wdtype == torch.int8 else None  # u8 rows where the variant has them
        out = kernels.linear(x, w, bias, scale, residual=residual, sums=sums)
        assert out.dtype == xdtype
        if wdtype == torch.int8 and xdtype == torch.float32:
            # int8 weights meet activations rounded per row, to int16 (step max|x|/32767: half a step at most)
            # or, on AVX-512 VNNI, to u8 (step (max(x, 0) - min(x, 0)) / 255: a step at most, the top level
            # clamped): each output may move by that times the row's absolute weight sum, plus fp32 noise.
            if kernels.u8_rows(k):
                step_err = u8_rows(x)[1].float() * dense.abs().sum(1)[None]
            else:
                step_err = x.abs().amax(1, keepdim=True) / 65534 * dense.abs().sum(1)[None]
            assert ((out - ref).abs() <= step_err + 1e-5 * ref.abs().max()).all()
        elif wdtype == torch.bfloat16 and m > 1 and kernels.has_gemm_bf16():
            # vdpbf16ps: two rows and more are rounded to bf16 as a bf16 GEMM rounds its inputs
            assert rel_err(ref, out) <= 1e-2
        else:
            assert rel_err(ref, out) <= (1e-5 if xdtype == torch.float32 else 1e-2)


# rows not a multiple of the register blocks, K and N tails, several K chunks
INT8_GEMM_SHAPES = [(1, 8, 24), (5, 37, 29), (130, 600, 50), (257, 1030, 77), (121, 3000, 24)]


def assert_exact_int8_product(out, x, w, scale, bias, rounded_rows) -> float:
    """out against float64 products of x's rows rounded by `rounded_rows` (the integers, the scales) with the
    int8 weights w, times scale, plus bias: only the output's rounding may differ (1e-6 of the largest output
    in fp32, 1e-2 in bf16). Returns that tolerance."""
    q, qs = rounded_rows(x.float())
    exact = (q @ w.double().T) * qs * scale.double() + bias.double()
    tol = 1e-6 if out.dtype == torch.float32 else 1e-2
    assert (out.double() - exact).abs().max() <= tol * exact.abs().max()
    return tol


def int16_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x's rows rounded to int16 as quantize_i16 does (fp32 scale max|x|/32767, 1 for a zero row, multiply by
    its fp32 inverse, round half to even): (the integers, the scales), in float64 for an exact reference."""
    top = x.abs().amax(1, keepdim=True)
    scale = torch.where(top > 0, top / 32767, torch.ones_like(top))
    return torch.round(x * (1 / scale)).double(), scale.double()


@needs_kernels
@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16])
def test_int8_gemm_matches_an_exact_reference_and_the_torch_path(xdtype):
    """The prefill GEMM (the variant's panels, K in chunks of 512) against float64 products of the
    int16-rounded activations with the int8 weights (only fp32 rounding differs: 1e-6 of the largest output),
    and against the dequantised fp32 product within the int16 rounding's bound; rows not a multiple of the
    register block, K and N tails, several chunks."""
    torch.manual_seed(0)
    for m, k, n in INT8_GEMM_SHAPES:
        x = torch.randn(m, k).to(xdtype)
        w = torch.randint(-127, 128, (n, k), dtype=torch.int8)
        scale, bias = torch.rand(n) * 0.01, torch.randn(n).to(xdtype)
        out = kernels.gemm_i8(x, kernels.pack_i8(w), scale, bias, n)
        assert out.dtype == xdtype and out.shape == (m, n)
        tol = assert_exact_int8_product(out, x, w, scale, bias, int16_rows)
        dense = w.float() * scale[:, None]
        ref = x.float() @ dense.T + bias.float()
        step_err = x.float().abs().amax(1, keepdim=True) / 65534 * dense.abs().sum(1)[None]
        assert ((out.float() - ref).abs() <= step_err + tol * ref.abs().max()).all()


def u8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x's rows rounded to u8 as quantize_u8 does (fp32 scale (max(x, 0) - min(x, 0)) / 255, zero point and levels
    by its fp32 inverse, rounded half to even, clamped to 0..255): (the levels minus the zero point, the scales),
    in float64 for an exact reference."""
    lo, hi = x.amin(1, keepdim=True).clamp(max=0), x.amax(1, keepdim=True).clamp(min=0)
    scale = torch.where(hi > lo, (hi - lo) / 255, torch.ones_like(hi))
    inv = 1 / scale
    zero = torch.round(-lo * inv)
    return ((torch.round(x * inv) + zero).clamp(0, 255) - zero).double(), scale.double()


@needs_kernels
@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16])
def test_u8_gemm_matches_an_exact_reference(kernel_isa, xdtype):
    """The u8 x int8 GEMM (vpdpbusd) against float64 products of the u8-rounded activations (a zero point a row)
    with the int8 weights: exact integer sums, one fp32 rounding; all-positive, all-negative and zero rows, rows
    not a multiple of the register block, K and N tails. A variant without it, and a K past its exact sums,
    refuse."""
    w = torch.randint(-127, 128, (24, 8), dtype=torch.int8)
    if not kernels.has_gemm_u8i8():
        with pytest.raises(RuntimeError, match="no u8 x int8 GEMM"):
            kernels.gemm_u8i8(torch.randn(4, 8), kernels.pack_u8i8(w), torch.rand(24), None, 24)
        pytest.skip(f"the {kernel_isa} kernels have no u8 x int8 GEMM (vpdpbusd)")
    big = torch.zeros(1, kernels.U8_MAX_K + 1, dtype=torch.int8)
    with pytest.raises(ValueError, match="too long"):
        kernels.gemm_u8i8(torch.randn(2, big.shape[1]), kernels.pack_u8i8(big), torch.rand(1), None, 1)
    torch.manual_seed(0)
    for m, k, n in INT8_GEMM_SHAPES:
        x = torch.randn(m, k)
        x[0] = x[0].abs() + 0.5  # one-signed rows: the zero point at an end of the range
        x[-1] = -x[-1].abs()
        if m > 2:
            x[1] = 0
        x = x.to(xdtype)
        w = torch.randint(-127, 128, (n, k), dtype=torch.int8)
        scale, bias = torch.rand(n) * 0.01, torch.randn(n).to(xdtype)
        out = kernels.gemm_u8i8(x, kernels.pack_u8i8(w), scale, bias, n)
        assert out.dtype == xdtype and out.shape == (m, n)
        assert_exact_int8_product(out, x, w, scale, bias, u8_rows)


@needs_kernels
@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16])
def test_bf16_gemm_matches_an_exact_reference(kernel_isa, xdtype):
    """The bf16 prefill GEMM (panels of 16 columns, 4 a block, 6-row register blocks, 120-row tasks) against
    float64 products of the bf16-rounded activations with the bf16 weights (fp32 sums: 1e-5 of the largest
    output), bias of either dtype or none; rows not a multiple of the block, K odd, N and column-stride tails;
    a variant without vdpbf16ps says so and refuses."""
    if not kernels.has_gemm_bf16():
        with pytest.raises(RuntimeError, match="no bf16 GEMM"):
            kernels.gemm_bf16(torch.randn(4, 8), kernels.pack_bf16(torch.randn(16, 8)), None, 16)
        pytest.skip(f"the {kernel_isa} kernels have no bf16 GEMM (vdpbf16ps)")
    torch.manual_seed(0)
    for m, k, n, bias_dtype in [(1, 8, 24, None), (5, 37, 29, torch.float32), (130, 601, 70, torch.bfloat16),
                                (257, 768, 130, torch.float32)]:
        x = torch.randn(m, k + 3)[:, 1:k + 1].to(xdtype)  # rows with a stride of their own
        w = torch.randn(n, k).to(torch.bfloat16)
        bias = None if bias_dtype is None else torch.randn(n).to(bias_dtype)
        out = kernels.gemm_bf16(x, kernels.pack_bf16(w), bias, n)
        assert out.dtype == xdtype and out.shape == (m, n)
        exact = x.to(torch.bfloat16).double() @ w.double().T + (0 if bias is None else bias.double())
        tol = 1e-5 if xdtype == torch.float32 else 1e-2  # bf16 output rounding
        assert (out.double() - exact).abs().max() <= tol * exact.abs().max()


@needs_kernels
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16, torch.float16])
def test_f32_gemm_matches_a_float64_reference(kernel_isa, wdtype):
    """The fp32 GEMM (weights read in place and widened into panels of two vectors' columns, register blocks of
    6 rows on AVX2 and 8 on AVX-512, K in chunks) against float64 products with the same weights: fp32 sums only
    (1e-5 of the largest output); rows not a multiple of the block, N not a multiple of a panel, K not a
    multiple of the 8 x 8 transposes or of a chunk, rows with a stride of their own, bias of either dtype or
    none. Activations that are not fp32 are refused."""
    torch.manual_seed(0)
    for m, k, n, bias_dtype in [(1, 8, 24, None), (5, 37, 29, torch.float32), (13, 300, 70, torch.bfloat16),
                                (130, 601, 50, torch.float32), (257, 1030, 33, None)]:
        x = torch.randn(m, k + 3)[:, 1:k + 1]
        w = torch.randn(n, k).to(wdtype)
        bias = None if bias_dtype is None else torch.randn(n).to(bias_dtype)
        out = kernels.gemm_f32(x, w, bias)
        assert out.dtype == torch.float32 and out.shape == (m, n)
        exact = x.double() @ w.double().T + (0 if bias is None else bias.double())
        assert (out.double() - exact).abs().max() <= 1e-5 * exact.abs().max()
    with pytest.raises(ValueError, match="float32"):
        kernels.gemm_f32(torch.randn(4, 8).to(torch.bfloat16), torch.randn(16, 8), None)


@needs_kernels
@pytest.mark.parametrize("act", [None, "gelu_new", "gelu", "relu"])
def test_fused_epilogues_equal_the_separate_passes(kernel_isa, act):
    """An activation and a residual added as the products write their outputs (the row kernel, the int8, u8,
    bf16 and fp32 GEMMs, as a prefill's MLP and projections call them) give the bits of the plain product followed by
    the activation kernel and torch's add, in fp32; in bf16, one rounding instead of two."""
    torch.manual_seed(0)
    m, k, n = 45, 72, 100
    w8 = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    wb = torch.randn(n, k).to(torch.bfloat16)
    scale, bias = torch.rand(n) * 0.01, torch.randn(n)
    products = {"row kernel": lambda x, **e: kernels.linear(x, wb, bias, **e),
                "int8 GEMM": lambda x, **e: kernels.gemm_i8(x, kernels.pack_i8(w8), scale, bias, n, **e)}
    if kernels.has_gemm_bf16():
        products["bf16 GEMM"] = lambda x, **e: kernels.gemm_bf16(x, kernels.pack_bf16(wb), bias, n, **e)
    if kernels.has_gemm_u8i8():
        products["u8 GEMM"] = lambda x, **e: kernels.gemm_u8i8(x, kernels.pack_u8i8(w8), scale, bias, n, **e)
    for dtype in (torch.float32, torch.bfloat16):
        x, residual = torch.randn(m, k).to(dtype), torch.randn(m, n).to(dtype)
        if dtype == torch.float32:  # fp32 activations only
            products["fp32 GEMM"] = lambda x, **e: kernels.gemm_f32(x, wb, bias, **e)
        else:
            products.pop("fp32 GEMM")
        for name, product in products.items():
            plain = product(x).float()
            if act is not None:
                assert kernels.activate_(plain, act)
            fused = product(x, act=act, residual=residual)
            assert fused.dtype == dtype, name
            if dtype == torch.float32:
                assert torch.equal(fused, plain + residual), name
            else:  # one bf16 rounding against two (the product's, through the activation's slope up to 1.13,
                # then the sum's), half an ulp each, of values up to the largest
                assert rel_err(plain + residual.float(), fused) <= 2 ** -7, name


@needs_kernels
def test_int8_kernels_give_the_same_bits_in_every_variant(kernel_isa, monkeypatch):
    """int8 products on int16 rows sum exact integers in column blocks cut alike by every variant (vpmaddwd on
    AVX2, VNNI vpdpwssd on AVX-512), each block rounded to fp32 once: the same bits as the AVX2 build, tails and
    odd row counts included; the prefill GEMM likewise (its K chunks), each variant on weights packed in its own
    panels, and a weight packed for another variant's panels is refused."""
    torch.manual_seed(0)
    w = torch.randint(-127, 128, (37, 3000), dtype=torch.int8)
    x, scale, bias = torch.randn(5, 3000), torch.rand(37), torch.randn(37)
    packed, xs = kernels.pack_i8(w), torch.randn(131, 3000)
    got = [kernels.linear(x[:m], w, bias, scale) for m in (1, 2, 5)]
    got.append(kernels.gemm_i8(xs, packed, scale, bias, 37))
    monkeypatch.setattr(kernels, "_lib", kernels._bind(ctypes.CDLL(str(build.build(AVX2).path))))
    monkeypatch.setattr(kernels, "_variant", AVX2)
    if kernel_isa != "avx2":
        with pytest.raises(ValueError, match="pack them again"):
            kernels.gemm_i8(xs, packed, scale, bias, 37)
    packed = kernels.pack_i8(w)
    want = [kernels.linear(x[:m], w, bias, scale) for m in (1, 2, 5)]
    want.append(kernels.gemm_i8(xs, packed, scale, bias, 37))
    assert all(torch.equal(a, b) for a, b in zip(want, got))


@needs_kernels
@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16])
def test_int8_rows_are_exact_and_independent_of_the_batch(kernel_isa, xdtype):
    """The row kernel (decode steps and up to 32 rows) against float64 products of the rounded rows with the
    int8 weights - int16 rows (vpmaddwd; AVX2's 4 x 3 and 2 x 4 blocks) or, on AVX-512 VNNI, u8 rows (vpdpbusd,
    the zero point taken off): exact integer sums, one fp32 rounding per column block, so each row gets the same
    bits alone as in any batch (1 to 33 rows: every register block and its remainders, K and N tails,
    one-signed and zero rows); u8 rows also the same bits as the u8 GEMM."""
    torch.manual_seed(0)
    for m, k, n in [(33, 3000, 37), (7, 29, 5), (16, 768, 64), (6, 100, 38)]:
        x = torch.randn(m, k)
        x[0] = x[0].abs() + 0.5
        x[1] = -x[1].abs()
        x[2] = 0
        x = x.to(xdtype)
        w = torch.randint(-127, 128, (n, k), dtype=torch.int8)
        scale, bias = torch.rand(n) * 0.01, torch.randn(n).to(xdtype)
        sums = kernels.row_sums(w)
        out = kernels.linear(x, w, bias, scale, sums=sums)
        assert_exact_int8_product(out, x, w, scale, bias, u8_rows if kernels.u8_rows(k) else int16_rows)
        alone = torch.cat([kernels.linear(x[i:i + 1], w, bias, scale, sums=sums) for i in range(m)])
        assert torch.equal(alone, out)
        if not kernels.u8_rows(k):  # AVX2 has no u8 path: rows with the sums given are its int16 rows
            assert torch.equal(out, kernels.linear(x, w, bias, scale))
            continue
        # the same integers and epilogue as the prefill's u8 GEMM: decoded and prefilled rows agree bit for bit
        assert torch.equal(out, kernels.gemm_u8i8(x, kernels.pack_u8i8(w), scale, bias, n))
        assert not torch.equal(out, kernels.linear(x, w, bias, scale))  # without the sums: int16, another path
    for wrong in (sums.float(), sums[:-1]):  # the C kernel would read N int32s from the pointer: checked first
        with pytest.raises(ValueError, match="row sums"):
            kernels.linear(x, w, bias, scale, sums=wrong)


@needs_kernels
def test_thread_pool_gives_every_thread_count_the_same_result():
    """The pool splits a job into one range per thread and lets threads steal from each other's ranges; every
    output element is still computed by one task, so 2-4 threads (also with a second Python thread calling at
    the same time, which runs its job alone) must equal one thread bit for bit, over many jobs of different
    sizes. The fp32 GEMM's tasks also change width with the thread count (more panels a task at one thread
    than at four)."""
    import threading

    torch.manual_seed(0)
    jobs = [functools.partial(kernels.linear, torch.randn(m, 256), torch.randn(n, 256).to(dt)) for m, n, dt in
            [(1, 1000, torch.float32), (3, 777, torch.bfloat16), (1, 4099, torch.float32), (8, 515, torch.float16)]]
    jobs.append(functools.partial(kernels.linear, torch.randn(2, 256),
                                  torch.randint(-127, 128, (2001, 256), dtype=torch.int8), scale=torch.rand(2001)))
    jobs.append(functools.partial(kernels.gemm_f32, torch.randn(200, 300), torch.randn(515, 300), None))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        want = [job() for job in jobs]
        for n in (2, 3, 4):
            torch.set_num_threads(n)
            results: list[list[torch.Tensor]] = [[], []]

            def work(i: int) -> None:
                for _ in range(20):
                    results[i].extend(job() for job in jobs)

            side = threading.Thread(target=work, args=(1,))
            side.start()
            work(0)
            side.join()
            for got in results:
                assert len(got) == 20 * len(jobs)
                for j, out in enumerate(got):
                    assert torch.equal(out, want[j % len(jobs)]), (n, j)
    finally:
        torch.set_num_threads(threads)


def _mapping_of(address: int) -> list[str]:
    """The /proc/self/smaps lines of the mapping holding `address`."""
    lines = Path("/proc/self/smaps").read_text().split("\n")
    for i, line in enumerate(lines):
        lo, _, rest = line.partition("-")
        if rest and all(c in "0123456789abcdef" for c in lo) and int(lo, 16) <= address < int(rest.split()[0], 16):
            return lines[i:i + 40]
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.parametrize("quantized", [False, True])
def test_moving_weights_to_huge_pages_keeps_the_model(quantized):
    """Weights moved into the huge-page mapping keep their values, tensor objects and the embedding/head tie
    (an int8 model's head is apart from its float embedding); the model computes the same logits and still
    trains; the mapping is advised for 2 MB pages."""
    from quill.quantize import quantize_model

    model = make_model(CONFIGS["odd"])
    if quantized:  # int8 weights are buffers
        model = quantize_model(model, "int8")
    named = lambda: dict(itertools.chain(model.named_parameters(remove_duplicate=False), model.named_buffers()))
    tensors = named()
    before = {name: t.clone() for name, t in tensors.items()}
    idx = torch.randint(0, 101, (2, 7))
    with torch.no_grad():
        want = model(idx)
    moved = kernels.move_to_huge_pages(tensors.values(), min_bytes=0)
    if moved == 0:
        pytest.skip("transparent huge pages are unavailable here")
    assert moved == sum(t.nbytes for t in {id(t): t for t in tensors.values()}.values())
    assert all(named()[name] is t and torch.equal(t, before[name]) for name, t in tensors.items())
    assert (model.lm_head.weight is model.transformer.wte.weight) != quantized
    flags = next(line.split()[1:] for line in _mapping_of(model.lm_head.weight.data_ptr()) if line.startswith("VmFlags:"))
    assert "hg" in flags  # advised MADV_HUGEPAGE
    with torch.no_grad():
        assert torch.equal(model(idx), want)
    if not quantized:
        model.train()
        F.cross_entropy(model(idx).flatten(0, 1), idx.flatten()).backward()
        assert model.transformer.wte.weight.grad is not None


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_argmax_with_bans_equals_index_fill_then_argmax(dtype):
    torch.manual_seed(0)
    logits = torch.randn(4, 1000).to(dtype)
    top = logits.float().argmax(-1)
    logits[2, 17] = float("nan")  # a NaN wins, unless it is banned
    logits[3, 5] = float("nan")
    banned = [[int(top[0])], [], [17], [5, int(top[3]), 999]]
    before = logits.clone()
    want = [int(row.index_fill(0, torch.tensor(ids, dtype=torch.long), float("-inf")).argmax()) if ids
            else int(row.argmax()) for row, ids in zip(logits, banned)]
    assert kernels.argmax_rows(logits, banned) == want
    assert torch.equal(logits.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                       before.view(torch.int16 if dtype == torch.bfloat16 else torch.int32))  # restored bit for bit
    too_many = [list(range(kernels.MAX_BANS + 1))] * 4  # beyond what the kernel takes: torch does it
    assert kernels.argmax_rows(logits, too_many) == [
        int(row.index_fill(0, torch.tensor(too_many[0]), float("-inf")).argmax()) for row in logits]


@needs_kernels
@pytest.mark.parametrize("nbits", [1000, 997, 1003, 960])  # the row's length, a partial last byte, past the row
def test_mask_bits_equals_unpacked_where(kernel_isa, nbits):
    rng = numpy.random.default_rng(nbits)
    logits = torch.randn(1, 1000)
    words = rng.integers(-2**31, 2**31, size=(nbits + 31) // 32, dtype=numpy.int64).astype(numpy.int32)
    words[1], words[2], words[3] = 0, -1, -2**31  # whole clear, whole set and one-bit words
    allowed = numpy.zeros(1000, dtype=bool)
    n = min(nbits, 1000)
    allowed[:n] = numpy.unpackbits(words.view(numpy.uint8), bitorder="little")[:n]
    want = torch.where(torch.from_numpy(allowed), logits, float("-inf"))
    out = torch.empty_like(logits)
    assert kernels.mask_bits(logits, torch.from_numpy(words), nbits, out) is out
    assert torch.equal(out, want)


@needs_kernels
@pytest.mark.parametrize("density", [0.001, 0.3, 0.99])
def test_argmax_and_ids_of_bits_equal_the_masked_row(kernel_isa, density):
    rng = numpy.random.default_rng(int(density * 1000))
    logits = torch.randn(1, 1003)
    allowed = rng.random(1000) < density  # ids 1000..1002 are past the mask: never allowed
    allowed[[5, 700]] = True
    bits = torch.from_numpy(numpy.packbits(allowed, bitorder="little"))
    ids = numpy.flatnonzero(allowed)
    masked = torch.full_like(logits, float("-inf"))
    masked[0, ids] = logits[0, ids]
    assert torch.equal(kernels.bits_ids(bits, 1000, torch.empty(1000, dtype=torch.int64)), torch.from_numpy(ids))
    assert kernels.bits_ids(bits, 1000, torch.empty(len(ids) - 1, dtype=torch.int64)) is None  # more than asked for
    one = torch.from_numpy(numpy.packbits(numpy.arange(1003) == 997, bitorder="little"))
    assert kernels.bits_ids(one, 1000, torch.empty(1, dtype=torch.int64)).tolist() == [997]
    assert kernels.bits_ids(one, 997, torch.empty(1, dtype=torch.int64)).tolist() == []  # past nbits: not set
    assert kernels.argmax_bits(logits, bits, 1000) == int(masked.argmax())
    top = int(masked.argmax())
    banned = [top, 3, 999]
    assert kernels.argmax_bits(logits, bits, 1000, banned) == int(masked.index_fill(1, torch.tensor(banned), float("-inf")).argmax())
    logits[0, 700] = float("nan")  # an allowed NaN wins, as in torch.argmax; a banned one does not
    masked[0, 700] = float("nan")
    assert kernels.argmax_bits(logits, bits, 1000) == int(masked.argmax()) == 700
    assert kernels.argmax_bits(logits, bits, 1000, [700]) == int(masked.index_fill(1, torch.tensor([700]), float("-inf")).argmax())
    assert kernels.argmax_bits(logits, bits, 1000, ids.tolist()) is None  # every allowed id banned
    assert kernels.argmax_bits(masked.index_fill(1, torch.from_numpy(ids), float("-inf")), bits, 1000) is None


@needs_kernels
@pytest.mark.parametrize("act", ["gelu_new", "gelu", "relu"])
def test_activation_kernel_matches_torch(act):
    from quill.model import ACTIVATIONS

    torch.manual_seed(0)
    x = torch.randn(3, 20011) * 4  # several pool tasks and a tail that is not a multiple of 8
    got = x.clone()
    assert kernels.activate_(got, act)
    assert (got - ACTIVATIONS[act](x)).abs().max() <= 2e-6 * x.abs().max()
    assert not kernels.activate_(x.t(), act) and not kernels.activate_(x.double(), act)  # not served: untouched


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("act", ["gelu_new", "relu"])
def test_activation_kernel_half(act, dtype):
    """bf16/fp16 are widened, activated in fp32 and rounded back: relu passes values through exactly, GELU
    lands within one unit in the last place of torch's result, plus the fp32 kernel's own error (GELU's
    tail, ~1e-6, is where the two approximations part)."""
    from quill.model import ACTIVATIONS

    torch.manual_seed(0)
    x = (torch.randn(3, 20011) * 4).to(dtype)
    got = x.clone()
    assert kernels.activate_(got, act)
    ref = ACTIVATIONS[act](x.float()).to(dtype)
    if act == "relu":
        assert torch.equal(got, ref)
        return
    ulp = ref.float().abs() * torch.finfo(dtype).eps
    assert ((got.float() - ref.float()).abs() <= ulp + 2e-6 * x.abs().max()).all()
    assert (got == ref).float().mean() > 0.9


@needs_kernels
@pytest.mark.parametrize("dtype,wdtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                          (torch.float16, torch.float32)])
@pytest.mark.parametrize("K", [768, 37])
def test_layer_norm_kernel_matches_torch(dtype, wdtype, K):
    """The pool's LayerNorm (prefill's) equals torch's LayerNorm of the fp32 rows to fp32 rounding, then rounds
    to x's dtype (within one unit in the last place there); rows of a strided view; no bias; not served for
    float64 or a weight of another length."""
    torch.manual_seed(0)
    ln = torch.nn.LayerNorm(K).to(wdtype).requires_grad_(False)
    torch.nn.init.normal_(ln.weight)
    torch.nn.init.normal_(ln.bias)
    x = (torch.randn(3, 50, 2 * K) * 3 + 1)[:, :, :K].to(dtype)  # 150 rows: several tasks; a row stride of 2K
    for bias in (ln.bias, None):
        got = kernels.layer_norm(x, ln.weight, bias, ln.eps)
        ref = F.layer_norm(x.float(), (K,), ln.weight.float(), None if bias is None else bias.float(), ln.eps)
        assert got.dtype == dtype and got.shape == x.shape
        tol = 1e-5 * ref.abs().max() + ref.abs() * (0 if dtype == torch.float32 else torch.finfo(dtype).eps)
        assert ((got.float() - ref).abs() <= tol).all()
    assert kernels.layer_norm(x.double(), ln.weight, ln.bias, ln.eps) is None
    assert kernels.layer_norm(x[..., 1:], ln.weight, ln.bias, ln.eps) is None


@needs_kernels
@pytest.mark.parametrize("src_dtype,dst_dtype", [(torch.float32, torch.bfloat16), (torch.float32, torch.float16),
                                                 (torch.bfloat16, torch.float32), (torch.float16, torch.float32),
                                                 (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32)])
def test_copy_kernel_rounds_as_torch(src_dtype, dst_dtype):
    """A strided 4-D copy (a permuted qkv projection into a slice of a KV cache) with a conversion: the values
    of torch's copy_ (round to nearest even; NaN stays NaN, infinities and overflow to infinity as torch's);
    nothing outside the slice written; lower ranks; not served for shapes that differ or a last dim that is
    not contiguous."""
    def same(a: torch.Tensor, b: torch.Tensor) -> bool:
        return torch.equal(a.isnan(), b.isnan()) and torch.equal(a.masked_fill(a.isnan(), 0), b.masked_fill(b.isnan(), 0))

    torch.manual_seed(0)
    B, T, H, D = 2, 37, 3, 20
    qkv = torch.randn(B, T, 3 * H * D) * 1e4  # beyond fp16's range too
    qkv.view(-1)[::97] = float("nan")
    qkv.view(-1)[1::89] = float("-inf")
    src = qkv.to(src_dtype).view(B, T, 3, H, D).permute(2, 0, 3, 1, 4)[1]  # [B, H, T, D], strided
    cache = torch.full((B, H, 50, D), 7.0, dtype=dst_dtype)
    want = cache.clone()
    want[:, :, 5:5 + T].copy_(src)
    assert kernels.copy_(cache[:, :, 5:5 + T], src) and same(cache, want)
    flat = torch.empty(T, D, dtype=dst_dtype)
    assert kernels.copy_(flat, src[1, 2]) and same(flat, src[1, 2].to(dst_dtype))
    assert not kernels.copy_(cache[:, :, :T], src[:, :, :T - 1])
    assert not kernels.copy_(cache[:, :, 5:5 + T].transpose(-1, -2), src.transpose(-1, -2))


@needs_kernels
@pytest.mark.parametrize("dtype,cache_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                               (torch.float32, torch.bfloat16), (torch.float32, torch.float16)])
@pytest.mark.parametrize("D", [12, 24, 64, 128])
def test_attention_kernel_writes_cache_and_matches_sdpa(dtype, cache_dtype, D):
    """The new key/value lands at each row's position, rounded to the cache's dtype as torch's cast rounds it,
    and attention over the cache as stored equals SDPA; no other position changes. Head widths: any (12), a
    multiple of 8 (scores 8 positions at a time), of 64 (the output in registers); 1, 6 and 20 positions."""
    torch.manual_seed(0)
    B, H, L = 3, 4, 20
    k_cache, v_cache = torch.randn(B, H, L, D).to(cache_dtype), torch.randn(B, H, L, D).to(cache_dtype)
    qkv = torch.randn(B, 3 * H * D).to(dtype)
    pos = torch.tensor([5, 0, 19])
    out = torch.empty(B, H * D, dtype=dtype)
    kc, vc = k_cache.clone(), v_cache.clone()
    kernels.attn_decode(qkv, kc, vc, pos, H, 0.3, out)
    for b in range(B):
        p = int(pos[b])
        q, k, v = qkv[b].view(3, H, 1, D)
        assert torch.equal(kc[b, :, p], k[:, 0].to(cache_dtype)) and torch.equal(vc[b, :, p], v[:, 0].to(cache_dtype))
        ref = F.scaled_dot_product_attention(q.float(), kc[b, :, :p + 1].float(), vc[b, :, :p + 1].float(), scale=0.3)
        assert rel_err(ref.reshape(-1), out[b]) <= (1e-5 if dtype == torch.float32 else 1e-2)
    untouched = torch.ones(L, dtype=torch.bool)
    untouched[[0, 5, 19]] = False
    assert torch.equal(kc[:, :, untouched][:, :, 1:], k_cache[:, :, untouched][:, :, 1:])


@needs_kernels
@pytest.mark.parametrize("B,T,start,H,D", [(1, 53, 0, 2, 16), (2, 24, 7, 3, 32), (3, 5, 30, 1, 64), (1, 1, 4, 2, 16)])
def test_prefill_attention_kernel_matches_sdpa(B, T, start, H, D):
    """Queries from the fused qkv projection (strided views) against keys/values in a cache, positions
    start..start+T-1: the kernel's causal attention equals SDPA with the explicit mask."""
    torch.manual_seed(0)
    L = start + T
    q = torch.randn(B, T, 3, H, D).permute(2, 0, 3, 1, 4)[0]  # [B, H, T, D] view of a qkv projection
    cache = torch.randn(2, B, H, L + 9, D)
    k, v = cache[0, :, :, :L], cache[1, :, :, :L]
    mask = torch.arange(L) <= torch.arange(start, L)[:, None]
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3).transpose(1, 2)
    got = kernels.attn_prefill(q, k, v, start, 0.3)
    assert got.shape == (B, T, H, D) and rel_err(ref, got) <= 1e-5
    assert kernels.attn_prefill(q[..., :8], k[..., :8], v[..., :8], start, 0.3) is None  # D not a multiple of 16
    half = [t.half() for t in (q, k, v)]  # fp16 keys: integer scores, the rest as in fp32
    assert rel_err(integer_scores_attention_reference(*half, start, 0.3), kernels.attn_prefill(*half, start, 0.3)) <= 1e-5
    assert kernels.attn_prefill(q.double(), k.double(), v.double(), start, 0.3) is None


def integer_scores_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int,
                                       scale: float) -> torch.Tensor:
    """The prefill attention's arithmetic for half keys: each query and key row rounded to int16 with one scale
    (its largest |value| to the bound under which D products sum exactly in int32, as the kernel's fp32 ops
    round it), exact integer scores rounded once to fp32 and scaled; softmax and values in float64. [B, T, H, D]"""
    L, D = k.shape[2], k.shape[3]
    qmax = torch.tensor(min(32767.0, float(int(((2 ** 31 - 1) / D) ** 0.5))))

    def rows_i16(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.float()
        mx = x.abs().amax(-1, keepdim=True)
        sc = torch.where(mx > 0, mx / qmax, torch.ones_like(mx))
        return torch.round(x * (1 / sc)).double(), sc

    (qi, qs), (ki, ks) = rows_i16(q), rows_i16(k)
    s = (qi @ ki.transpose(-1, -2)).float() * (qs * scale) * ks.transpose(-1, -2)
    s = s.double().masked_fill(torch.arange(L) > torch.arange(start, L)[:, None], float("-inf"))
    w = torch.exp(s - s.amax(-1, keepdim=True))
    return ((w @ v.double()) / w.sum(-1, keepdim=True)).transpose(1, 2)


def bf16_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, scale: float) -> torch.Tensor:
    """The bf16 prefill attention's arithmetic in float64: q scaled, then rounded to bf16; exact scores; the
    softmax weights rounded to bf16 and normalised by their sum. [B, T, H, D]"""
    L = k.shape[2]
    s = (q.float() * scale).bfloat16().double() @ k.double().transpose(-1, -2)
    s = s.masked_fill(torch.arange(L) > torch.arange(start, L)[:, None], float("-inf"))
    w = torch.exp(s - s.amax(-1, keepdim=True)).float().bfloat16().double()
    return ((w @ v.double()) / w.sum(-1, keepdim=True)).transpose(1, 2)


@needs_kernels
@pytest.mark.parametrize("B,T,start,H,D", [(1, 53, 0, 2, 16), (2, 24, 7, 3, 32), (3, 5, 30, 1, 64), (1, 1, 4, 2, 16),
                                           (1, 70, 3, 2, 64), (1, 33, 0, 1, 128)])
def test_prefill_attention_on_bf16_caches(kernel_isa, B, T, start, H, D):
    """bf16 keys and values (a bf16 or int8 model's cache): on vdpbf16ps where the variant has it, equal to the
    float64 model of its rounding (fp32 sums: 1e-5 of the largest output; a bf16 q gets a bf16 output) for
    query blocks, key blocks and dims with tails and an odd key count; elsewhere integer scores, equal to the
    model of theirs (1e-5) and within 2e-3 of exact attention over the same bf16 keys and values."""
    torch.manual_seed(0)
    L = start + T
    cache = torch.randn(2, B, H, L + 9, D).bfloat16()
    k, v = cache[0, :, :, :L], cache[1, :, :, :L]
    for qdtype in (torch.float32, torch.bfloat16):
        q = torch.randn(B, T, 3, H, D).permute(2, 0, 3, 1, 4)[0].to(qdtype)  # [B, H, T, D] view of a qkv projection
        got = kernels.attn_prefill(q, k, v, start, 0.3)
        if not kernels.has_gemm_bf16():
            assert got.dtype == torch.float32 and got.shape == (B, T, H, D)
            assert rel_err(integer_scores_attention_reference(q, k, v, start, 0.3), got) <= 1e-5
            exact = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), scale=0.3,
                                                   attn_mask=torch.arange(L) <= torch.arange(start, L)[:, None])
            assert rel_err(exact.transpose(1, 2), got) <= 2e-3
            continue
        want = bf16_attention_reference(q, k, v, start, 0.3)
        tol = 1e-5 if qdtype == torch.float32 else 2 ** -8  # bf16 output rounding
        assert got.dtype == qdtype and got.shape == (B, T, H, D) and rel_err(want, got.double()) <= tol


@pytest.mark.parametrize("name", ["odd", "untied-gelu-upcast"])
def test_bf16_logits_close_to_fp32(name):
    cfg = CONFIGS[name]
    model = make_model(cfg)
    x = torch.randint(0, cfg.vocab_size, (2, 11))
    with torch.inference_mode():
        ref = model(x)
        cache_ref = model.new_cache(2)
        model(x[:, :10], 0, cache_ref)
        step_ref = model(x[:, 10:], 10, cache_ref)
        model.to(torch.bfloat16)
        assert rel_err(ref, model(x)) <= 5e-2
        cache = model.new_cache(2)
        model(x[:, :10], 0, cache)
        assert rel_err(step_ref, model(x[:, 10:], 10, cache)) <= 5e-2


@pytest.mark.parametrize("half_gemm", [False, True])
@pytest.mark.parametrize("name", ["odd", "untied-gelu-upcast"])
def test_half_weights_under_fp32_activations(name, half_gemm, monkeypatch):
    """GPT.weights_to (quill.load's half dtype on the CPU): the torch path over 40 rows (a prefill, on the fp32
    GEMM or, where the CPU has one, on the half GEMM with its inputs rounded) and the decode kernels equal
    the fp32 model whose matrices were rounded the same way (1e-5; through the half GEMM, which rounds its
    inputs and outputs, the bf16 tolerance 5e-2)."""
    monkeypatch.setattr("quill.model._cpu_half_gemm", lambda dtype: half_gemm)
    cfg = dataclasses.replace(CONFIGS[name], n_positions=64)
    model = make_model(cfg)
    rounded = make_model(cfg)
    with torch.no_grad():
        for m in rounded.modules():
            if isinstance(m, nn.Linear) or m is rounded.transformer.wte:
                m.weight.copy_(m.weight.bfloat16().float())
    model.weights_to(torch.bfloat16)
    assert model.dtype == torch.float32 and model.lm_head.weight.dtype == torch.bfloat16
    x = torch.randint(0, cfg.vocab_size, (1, 41))
    with torch.inference_mode():
        ref, got = rounded(x[:, :40]), model(x[:, :40])
        assert got.dtype == torch.float32
        assert rel_err(ref, got) <= (5e-2 if half_gemm else 1e-5)
        steps = []
        for m in (rounded, model):  # the prompt prefilled into the cache, then one step on the decode kernels
            cache = m.new_cache(1)
            m(x[:, :40], 0, cache)
            steps.append(m(x[:, 40:], 40, cache))
    assert rel_err(*steps) <= (5e-2 if half_gemm else 1e-5)


def _run_batch(model: GPT, tok: Tokenizer, prompts: list[list[int]], capacity: int,
               stagger: bool) -> list[list[int]]:
    """Decode `prompts` greedily in one DecodeBatch (optionally adding them one step apart); rows have
    different lengths (8 + len(prompt) % 5 new tokens) so they finish at different steps."""
    reqs = [GenerationRequest(prompt_ids=p, max_tokens=8 + len(p) % 5,
                              sampling=SamplingParams(temperature=0, ignore_eos=True)) for p in prompts]
    seqs = [Sequence(r, tok, model.config.n_positions, [], None, index=i) for i, r in enumerate(reqs)]
    batch = DecodeBatch(model, capacity)
    pending = list(seqs)
    while pending or batch.rows:
        if pending and batch.free and (stagger or not batch.rows):
            for s in (pending[:1] if stagger else pending):
                batch.add([s])
            pending = pending[1:] if stagger else []
        batch.step()
    return [s.generated for s in seqs]


@pytest.mark.parametrize("dtype,kv_dtype", [(torch.float32, None), (torch.bfloat16, None),
                                            (torch.float32, torch.bfloat16)])
def test_batched_decoding_equals_one_by_one(dtype, kv_dtype):
    cfg = GPTConfig(vocab_size=len(CHARS), n_positions=64, n_embd=32, n_head=2, n_layer=2)
    model = make_model(cfg, dtype, seed=1)
    model.kv_dtype = kv_dtype
    tok = Tokenizer.characters(CHARS)
    torch.manual_seed(3)
    prompts = [torch.randint(0, cfg.vocab_size, (n,)).tolist() for n in (3, 9, 1, 14, 6, 11, 2, 8, 5)]
    alone = [_run_batch(model, tok, [p], 1, False)[0] for p in prompts]
    assert _run_batch(model, tok, prompts, len(prompts), False) == alone
    assert _run_batch(model, tok, prompts, 4, True) == alone  # ragged: rows join and leave mid-way


CHARS = "abcdefghijklmnopqrstuvwxyz .,"


def _compile_works() -> bool:
    try:
        f = torch.compile(lambda t: t * 2 + 1, dynamic=False)
        return bool(torch.equal(f(torch.ones(3)), torch.full((3,), 3.0)))
    except Exception:
        return False


@pytest.mark.skipif(not _compile_works(), reason="torch.compile unavailable here")
def test_compiled_equals_eager():
    cfg = GPTConfig(vocab_size=53, n_positions=32, n_embd=32, n_head=2, n_layer=1)
    eager = make_model(cfg)
    compiled = compile_model(make_model(cfg))
    x = torch.randint(0, cfg.vocab_size, (2, 7))
    eager.use_kernels = False  # compare with the torch path the compiled graph was traced from
    with torch.inference_mode():
        caches = [eager.new_cache(2), compiled.new_cache(2)]
        assert rel_err(eager(x[:, :6], 0, caches[0]), compiled(x[:, :6], 0, caches[1])) <= 1e-5
        assert rel_err(eager(x[:, 6:], 6, caches[0]), compiled(x[:, 6:], 6, caches[1])) <= 1e-5
        assert rel_err(caches[0].k, caches[1].k) <= 1e-5


@pytest.mark.parametrize("ragged", [False, True])
def test_fixed_span_attention_equals_exact_span(ragged):
    """`span=` (the whole cache under a mask: CUDA graphs' static shapes) gives the same logits and cache."""
    cfg = CONFIGS["odd"]
    model = make_model(cfg)
    model.use_kernels = False  # the torch path is the one CUDA runs
    prompt = torch.randint(0, cfg.vocab_size, (3, 9))
    token = torch.randint(0, cfg.vocab_size, (3, 1))
    starts = torch.tensor([9, 4, 7]) if ragged else 9
    out, caches = [], []
    for span in (None, cfg.n_positions):
        cache = model.new_cache(3)
        with torch.inference_mode():
            model(prompt, 0, cache)
            out.append(model(token, starts, cache, span=span))
        caches.append(cache)
    # the same up to summation order: the masked positions add exact zeros, but SDPA's kernel sums differently
    assert rel_err(out[0], out[1]) <= 1e-6
    assert rel_err(caches[0].k, caches[1].k) <= 1e-6 and rel_err(caches[0].v, caches[1].v) <= 1e-6


def test_a_finished_generation_leaves_its_cache_for_the_next():
    """A generation's cache goes back to the model when it ends (early or not), and the next one of that shape
    gets it zeroed; one is kept, of the last shape."""
    cfg = GPTConfig(vocab_size=len(CHARS), n_positions=64, n_embd=32, n_head=2, n_layer=2)
    model = make_model(cfg, seed=1)
    tok = Tokenizer.characters(CHARS)
    request = GenerationRequest(prompt_ids=[1, 2, 3], max_tokens=5, sampling=SamplingParams(temperature=0))
    events = generate.run(model, tok, request)
    next(events)
    used = model.__dict__.get("_spare_cache")
    events.close()  # a consumer that stops early
    spare = model.__dict__["_spare_cache"]
    assert used is None and spare.k.shape[1::2] == (1, 8)
    spare.k.fill_(float("nan")), spare.v.fill_(float("nan"))
    assert model.new_cache(2, 8).k.data_ptr() != spare.k.data_ptr()  # another shape: a cache of its own
    model.recycle_cache(spare)
    again = model.new_cache(1, 8)
    assert again is spare and not again.k.any() and not again.v.any()
    assert model.new_cache(1, 8) is not spare  # taken: the next is fresh
    tokens = [ev.token for ev in generate.run(model, tok, request)]
    assert tokens == [ev.token for ev in generate.run(model, tok, request)]  # the second on the first's cache


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_decoding_equals_eager(dtype):
    """Generation replayed from captured CUDA graphs (rows joining and leaving: one graph per row count)
    makes the same tokens as eager CUDA steps, which make the same tokens as the CPU in fp32."""
    cfg = GPTConfig(vocab_size=len(CHARS), n_positions=64, n_embd=32, n_head=2, n_layer=2)
    model = make_model(cfg, dtype, seed=1).cuda()
    tok = Tokenizer.characters(CHARS)
    torch.manual_seed(3)
    prompts = [torch.randint(0, cfg.vocab_size, (n,)).tolist() for n in (3, 9, 1, 14, 6)]
    graphed = _run_batch(model, tok, prompts, 3, True)
    model.use_cuda_graphs = False
    assert graphed == _run_batch(model, tok, prompts, 3, True)
    if dtype == torch.float32:
        assert graphed == _run_batch(make_model(cfg, dtype, seed=1), tok, prompts, 3, True)


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
def test_engine_on_cuda_equals_cpu(tiny_model_dir):
    """The engine on a GPU against the CPU, through `quill.load(..., device="cuda")`: greedy tokens, logprobs,
    echo, beam search, int8 and bf16 logits."""
    import quill

    prompt, kw = "the quick brown", dict(max_tokens=12, temperature=0, logprobs=3, echo=True)
    cpu, gpu = quill.load(tiny_model_dir), quill.load(tiny_model_dir, device="cuda")
    a, b = cpu.generate(prompt, **kw).choices[0], gpu.generate(prompt, **kw).choices[0]
    assert a.tokens == b.tokens
    assert [t.logprob for t in b.logprobs] == pytest.approx([t.logprob for t in a.logprobs], abs=1e-4)
    assert [t.logprob for t in b.prompt_logprobs[1:]] == pytest.approx(
        [t.logprob for t in a.prompt_logprobs[1:]], abs=1e-4)
    beam = dict(max_tokens=8, num_beams=3, n=2)
    assert [c.tokens for c in gpu.generate(prompt, **beam).choices] == \
        [c.tokens for c in cpu.generate(prompt, **beam).choices]
    ids = torch.tensor([cpu.encode(prompt)])
    with torch.inference_mode():
        ref = cpu.model(ids)
        int8_cpu = quill.load(tiny_model_dir, quantize="int8").model(ids)
        int8_gpu = quill.load(tiny_model_dir, quantize="int8", device="cuda").model(ids.cuda()).cpu()
        bf16_gpu = quill.load(tiny_model_dir, dtype="bfloat16", device="cuda").model(ids.cuda()).cpu()
    assert rel_err(int8_cpu, int8_gpu) <= 1e-3  # int16 activations on the CPU kernels, fp32 ones on CUDA
    assert rel_err(ref, bf16_gpu) <= 5e-2


@needs_cuda
def test_cuda_graph_capture_beside_another_thread(tiny_model_dir):
    """Two models generating at once in two threads (as the server's per-model schedulers do): one thread
    captures graphs while the other launches work, and each makes the tokens it makes alone."""
    import threading

    import quill

    engines = [quill.load(tiny_model_dir, device="cuda") for _ in range(2)]
    prompts = ["abc", "the quick"]
    alone = [e.generate(p, 60, temperature=0, ignore_eos=True).tokens for e, p in zip(engines, prompts)]
    together: dict[int, list[int]] = {}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            for _ in range(5):
                together[i] = engines[i].generate(prompts[i], 60, temperature=0, ignore_eos=True).tokens
        except BaseException as e:  # reported below: a thread's exception would otherwise vanish
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert [together[0], together[1]] == alone


def _greedy_rows(model: GPT, tok: Tokenizer, requests: list[GenerationRequest], burst: float) -> list[tuple]:
    """Decode `requests` together in one DecodeBatch, stepping with `burst`; each row's tokens, finish reason,
    FLOPs and number of events."""
    seqs = [Sequence(r, tok, model.config.n_positions, [3], None, index=i) for i, r in enumerate(requests)]
    batch = DecodeBatch(model, len(seqs))
    events = [ev for s in seqs for ev in batch.add([s])]
    while batch.rows:
        events += batch.step(burst)
    return [(s.generated, s.finish_reason, s.usage.flops, sum(ev.seq is s for ev in events)) for s in seqs]


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows_per_call", [None, 3])
def test_greedy_bursts_equal_single_steps(dtype, rows_per_call, monkeypatch):
    """Several greedy steps in one kernel call give the tokens, endings, costs and events of single steps:
    a stop id ends the burst in C, and no row runs past its length limit, its budget or the context; also where
    each step runs the rows in calls of fewer (a batch that outgrows the caches)."""
    if rows_per_call is not None:
        monkeypatch.setattr(plan.Decoder, "rows_per_call", lambda self, model, batch, k: min(batch, rows_per_call))
    cfg = GPTConfig(vocab_size=len(CHARS), n_positions=64, n_embd=32, n_head=2, n_layer=2)
    model = make_model(cfg, dtype, seed=1)
    tok = Tokenizer.characters(CHARS)
    torch.manual_seed(5)
    prompts = [torch.randint(0, cfg.vocab_size, (n,)).tolist() for n in (3, 9, 14, 6)]
    greedy = SamplingParams(temperature=0, ignore_eos=True)
    plain = [GenerationRequest(prompt_ids=p, max_tokens=20, sampling=greedy) for p in prompts]
    alone = [_greedy_rows(model, tok, [r], 0.0)[0][0] for r in plain]
    step_flops = _greedy_rows(model, tok, plain[:1], 0.0)[0][2]
    requests = [
        # a stop id the row meets after a few tokens (from its own single-step run), EOS (id 3) counted
        GenerationRequest(prompt_ids=prompts[0], max_tokens=20, stop_token_ids=[alone[0][6]],
                          sampling=SamplingParams(temperature=0)),
        GenerationRequest(prompt_ids=prompts[1], max_tokens=13, sampling=dataclasses.replace(
            greedy, banned_tokens=tuple(alone[1][:3]))),  # bans: skipped in the argmax
        GenerationRequest(prompt_ids=prompts[2], max_tokens=None, sampling=greedy),  # to the end of the context
        GenerationRequest(prompt_ids=prompts[3], max_tokens=20, sampling=greedy, max_flops=step_flops // 2),
    ]
    calls = []
    real = kernels.decode_greedy
    monkeypatch.setattr(kernels, "decode_greedy", lambda *a, **k: calls.append(real(*a, **k)) or calls[-1])
    stepped = _greedy_rows(model, tok, requests, 0.0)
    assert not calls
    assert [r[1] for r in stepped] == ["stop", "length", "length", "budget"]
    for rows in (requests, [requests[0]], requests[1:]):  # alone, and rows of different lengths together
        calls.clear()
        bursts = _greedy_rows(model, tok, rows, 10.0)
        assert bursts == [stepped[requests.index(r)] for r in rows]
        assert max(map(len, calls)) > 1  # the bursts ran
        # and computed no step whose token was not emitted (a row's first token comes from its prefill)
        assert sum(len(c) * len(c[0]) for c in calls) <= sum(len(b[0]) - 1 for b in bursts)


@needs_kernels
def test_greedy_burst_ends_on_interrupt_and_deadline():
    model = make_model(CONFIGS["odd"], seed=2)
    prompt = torch.arange(5)[None]
    runs = {}
    for name, deadline, interrupt in (("open", 1e12, None), ("late", 0.0, None), ("asked", 1e12, kernels.Interrupt())):
        if interrupt is not None:
            interrupt.set()
        cache = model.new_cache(1)
        with torch.inference_mode():
            model(prompt, 0, cache)
            runs[name] = model.decode_greedy(torch.tensor([[7]]), 5, cache, [[]], [[]], 6, deadline, interrupt)
    cache = model.new_cache(1)
    single, token = [], torch.tensor([[7]])
    with torch.inference_mode():
        model(prompt, 0, cache)
        for p in range(5, 11):
            token = model(token, p, cache)[:, -1].argmax(-1, keepdim=True)
            single.append(token.tolist()[0])
    assert runs["open"] == single
    assert runs["late"] == runs["asked"] == single[:1]  # one step always runs
