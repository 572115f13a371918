"""Int8 weight-only quantisation: error bounds, decode kernels vs torch, checkpoints, CLI, perplexity.

Tolerances:
- per weight: |w - q*scale| <= scale/2 (round to nearest), scale = max|w_row|/127;
- logits of a random tiny model: int8 vs fp32 within 3% of the largest logit. Each weight carries up to
  0.4% (1/254) relative rounding error on its row's range; errors of independent weights mostly cancel in
  the dot products, and what is left compounds through 2 layers and the head;
- int8 kernels vs the int8 torch path (dequantised GEMM): 1e-5, the same arithmetic in another order;
- perplexity of a briefly trained character model: within 1% of fp32 (the issue's bar), also when
  decoding with the bf16 KV cache an int8 model gets from quill.load.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import quill
from quill import kernels
from quill.cli import main as cli_main
from quill.errors import CheckpointError, InvalidParameter
from quill.model import GPT, GPTConfig
from quill.quantize import (Int8Linear, QUANT_METHOD, is_quantized_model, load_quantized,
                            quantize_model, quantize_weight, save_quantized)
from quill.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]


def rel_err(a, b) -> float:
    a, b = a.float(), b.float()
    return float((a - b).abs().max() / a.abs().max())


def random_model(cfg: GPTConfig, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" not in name:
                p.normal_(0, 0.2 if name.endswith("weight") else 0.05)
    return model


TINY = GPTConfig(vocab_size=101, n_positions=40, n_embd=48, n_head=3, n_layer=2)


def test_quantize_weight_error_bound():
    torch.manual_seed(0)
    w = torch.randn(64, 100) * torch.rand(64, 1) * 3
    w[3] = 0  # an all-zero row keeps a finite scale
    q, scale = quantize_weight(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (64,)
    assert int(q.abs().max()) <= 127 and torch.isfinite(scale).all()
    assert ((w - q.float() * scale[:, None]).abs() <= scale[:, None] / 2 + 1e-7).all()
    assert torch.equal(q[3], torch.zeros(100, dtype=torch.int8))


def test_module_swap_covers_every_linear_and_keeps_the_embedding_float():
    model = random_model(TINY)
    rows = model.transformer.wte.weight.detach().clone()
    quantize_model(model)
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert isinstance(model.lm_head, Int8Linear) and type(model.transformer.wte) is torch.nn.Embedding
    # the input side reads the tied matrix's own rows in bf16, not the head's int8 ones
    assert torch.equal(model.transformer.wte.weight, rows.bfloat16())
    idx = torch.tensor([[0, 5, 100], [7, 7, 3]])
    with torch.inference_mode():
        assert torch.equal(model.transformer.wte(idx), rows.bfloat16()[idx])
    assert is_quantized_model(model)
    untied = quantize_model(random_model(GPTConfig(**{**TINY.__dict__, "tie_word_embeddings": False})))
    assert isinstance(untied.lm_head, Int8Linear) and isinstance(untied.transformer.wte, torch.nn.Embedding)


@pytest.mark.skipif(not kernels.available(), reason="quill kernels unavailable")
@pytest.mark.usefixtures("kernel_isa")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_logits_close_to_fp32_and_kernels_match_torch(dtype):
    model = random_model(TINY).to(dtype)
    x = torch.randint(0, TINY.vocab_size, (2, 12))
    with torch.inference_mode():
        ref = model(x)
        quantize_model(model)
        assert model.dtype == dtype
        full = model(x)
        assert full.dtype == dtype
        # weights on 8 bits, and on AVX-512 VNNI the activations too (u8 rows: one more rounding of that size)
        assert rel_err(ref, full) <= ((4e-2 if kernels.u8_rows(TINY.n_embd) else 3e-2) if dtype == torch.float32 else 6e-2)
        # a decode step on the kernels equals the same step through the dequantised torch path
        steps = []
        for use in (False, True):
            model.use_kernels = use
            cache = model.new_cache(2)
            model(x[:, :11], 0, cache)
            steps.append(model(x[:, 11:], torch.tensor([11, 11]), cache))
        # the int8 kernels (decode steps, and short prefills such as `full`) round activations per row to int16
        # (a relative step of 2^-15 ~ 3e-5 per projection, a few projections deep) or on AVX-512 VNNI to u8 (the
        # head excepted: a step of 1/255 of the row's range)
        tol = (2e-2 if kernels.u8_rows(TINY.n_embd) else 2e-4) if dtype == torch.float32 else 5e-2
        assert rel_err(steps[0], steps[1]) <= tol
        assert rel_err(full[:, 11:], steps[0]) <= tol


@pytest.mark.skipif(not kernels.available(), reason="quill kernels unavailable")
@pytest.mark.usefixtures("kernel_isa")
def test_quantizing_a_model_that_has_decoded_replaces_its_decode_plan():
    """The kernels' plan holds the fp32 weights' addresses (kept alive): an in-place swap must drop it."""
    model, fresh = random_model(TINY), quantize_model(random_model(TINY))
    x = torch.randint(0, TINY.vocab_size, (1, 6))

    def step(m: GPT) -> torch.Tensor:
        cache = m.new_cache(1)
        m(x[:, :5], 0, cache)
        return m(x[:, 5:], 5, cache)

    with torch.inference_mode():
        before = step(model)  # builds the plan over the fp32 weights
        quantize_model(model)
        after, want = step(model), step(fresh)
    assert rel_err(want, after) <= 1e-6 < rel_err(want, before)


@pytest.mark.skipif(torch.backends.quantized.engine not in ("x86", "fbgemm"), reason="needs fbgemm")
def test_long_inputs_use_the_int8_gemm_and_follow_weight_changes(monkeypatch):
    torch.manual_seed(0)
    layer = Int8Linear.from_linear(torch.nn.Linear(96, 80))
    x = torch.randn(3, 40, 96)  # 120 rows: a prefill, beyond the matrix-vector kernel
    # With the kernels, Quill's int8 GEMM serves by default: int16 activations, one scale a row (within 1e-4 of
    # the exact product), or on AVX-512 VNNI its u8 GEMM (8 bits and a zero point a row: within 1e-2); without
    # them fbgemm's, activations quantised per tensor to 7-bit unsigned (reduce_range): error ~ (max-min) / 254
    # per element.
    own = kernels.available()
    u8 = own and kernels.u8_rows(96)
    tol = 1e-2 if u8 else 1e-4 if own else 3e-2
    with torch.inference_mode():
        exact = F.linear(x, layer.dequantized(torch.float32), layer.bias)
        got = layer(x)
        assert got.shape == exact.shape and (layer._u8_panels if u8 else layer._panels if own else layer._packed).made
        assert rel_err(exact, got) <= tol
        layer.weight.neg_()  # an in-place change must not be served from the old packed weight
        assert rel_err(F.linear(x, layer.dequantized(torch.float32), layer.bias), layer(x)) <= tol
        made_in_inference = Int8Linear(layer.weight.clone(), layer.weight_scale.clone(), layer.bias.clone())
        assert torch.equal(made_in_inference(x), layer(x))  # inference tensors have no version counter
        assert torch.equal(layer._gemm(x), made_in_inference._gemm(x))  # fbgemm's packed weight follows too
        assert rel_err(F.linear(x, layer.dequantized(torch.float32), layer.bias), layer._gemm(x)) <= 3e-2
        monkeypatch.setenv("QUILL_INT8_GEMM", "0")  # fbgemm out: without the kernels, the dequantised GEMM
        monkeypatch.setenv("QUILL_KERNELS", "0")
        kernels.reload()
        try:
            assert torch.equal(layer(x), F.linear(x, layer.dequantized(torch.float32), layer.bias))
        finally:
            monkeypatch.undo()
            kernels.reload()


def test_save_load_round_trip_is_exact(tmp_path):
    model = quantize_model(random_model(TINY))
    save_quantized(model, tmp_path / "q")
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == QUANT_METHOD
    back = load_quantized(tmp_path / "q")
    x = torch.randint(0, TINY.vocab_size, (2, 9))
    with torch.inference_mode():
        assert torch.equal(model(x), back(x))
    assert [m for m in back.modules() if isinstance(m, Int8Linear) and not m.u8_inputs] == [back.lm_head]
    # the file holds int8 matrices and fp32 scales under HF names, and the embedding in bf16
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "q" / "model.safetensors")
    assert tensors["transformer.h.0.attn.c_attn.weight"].dtype == torch.int8
    assert tensors["transformer.h.0.attn.c_attn.weight"].shape == (3 * 48, 48)  # [out, in]
    assert tensors["lm_head.weight"].dtype == torch.int8 and tensors["lm_head.weight_scale"].dtype == torch.float32
    assert tensors["transformer.wte.weight"].dtype == torch.bfloat16
    # the earlier layout (the tied head's int8 matrix as the embedding) loads, its rows dequantised
    q, s = tensors.pop("lm_head.weight"), tensors.pop("lm_head.weight_scale")
    tensors.update({"transformer.wte.weight": q, "transformer.wte.weight_scale": s})
    save_file(tensors, tmp_path / "q" / "model.safetensors")
    old = load_quantized(tmp_path / "q")
    assert torch.equal(old.lm_head.weight, q) and torch.equal(old.lm_head.weight_scale, s)
    assert torch.equal(old.transformer.wte.weight, (q.float() * s[:, None]).bfloat16())


def test_corrupt_quantized_checkpoints_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    save_quantized(quantize_model(random_model(TINY)), tmp_path / "q")
    path = tmp_path / "q" / "model.safetensors"
    tensors = load_file(path)
    missing = {k: v for k, v in tensors.items() if k != "transformer.h.1.mlp.c_fc.weight_scale"}
    save_file(missing, path)
    with pytest.raises(CheckpointError, match="c_fc.weight_scale"):
        load_quantized(tmp_path / "q")
    tensors["transformer.h.0.attn.c_proj.weight"] = tensors["transformer.h.0.attn.c_proj.weight"].float()
    save_file(tensors, path)
    with pytest.raises(CheckpointError, match="dtype"):
        load_quantized(tmp_path / "q")
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "gptq"}
    (tmp_path / "q" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="gptq"):
        load_quantized(tmp_path / "q")


def test_engine_and_cli(tmp_path, tiny_model_dir, capsys):
    fp32 = quill.load(tiny_model_dir)
    on_load = quill.load(tiny_model_dir, quantize="int8")
    assert is_quantized_model(on_load.model)
    with pytest.raises(InvalidParameter, match="quantize"):
        quill.load(tiny_model_dir, quantize="int4")
    # KV cache dtype: the activations' by default, bf16 for an int8 model, or as asked
    assert fp32.model.new_cache(1, 8).k.dtype == torch.float32
    assert on_load.model.new_cache(1, 8).k.dtype == torch.bfloat16
    asked = quill.load(tiny_model_dir, quantize="int8", kv_cache="float32")
    assert asked.model.new_cache(1, 8).v.dtype == torch.float32
    with pytest.raises(InvalidParameter, match="kv_cache") as e:
        quill.load(tiny_model_dir, kv_cache="int4")
    assert e.value.param == "kv_cache"
    assert cli_main(["quantize", str(tiny_model_dir), str(tmp_path / "q8"), "--int8"]) == 0
    assert json.loads(capsys.readouterr().out)["mode"] == "int8"
    saved = quill.load(tmp_path / "q8")  # detected from config.json, tokenizer copied along
    assert is_quantized_model(saved.model)
    prompt = "hello there"
    a = on_load.generate(prompt, 12, temperature=0)
    b = saved.generate(prompt, 12, temperature=0)
    assert a.tokens == b.tokens and a.text == b.text
    assert len(fp32.generate(prompt, 12, temperature=0).tokens) == len(a.tokens)
    assert cli_main(["quantize", str(tmp_path / "q8"), str(tmp_path / "again")]) == 2  # already int8


def _train_char_model(text: str, steps: int = 150) -> tuple[GPT, Tokenizer]:
    tok = Tokenizer.characters(text)
    data = torch.tensor(tok.encode(text))
    cfg = GPTConfig(vocab_size=tok.vocab_size, n_positions=64, n_embd=64, n_head=4, n_layer=2)
    torch.manual_seed(0)
    model = GPT(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ix = torch.randint(0, len(data) - 65, (16,), generator=gen)
        x = torch.stack([data[i:i + 64] for i in ix])
        y = torch.stack([data[i + 1:i + 65] for i in ix])
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval(), tok


def _perplexity(model: GPT, ids: torch.Tensor) -> float:
    with torch.inference_mode():
        x = ids[: len(ids) // 64 * 64 + 1]
        inp, tgt = x[:-1].view(-1, 64), x[1:].view(-1, 64)
        return math.exp(float(F.cross_entropy(model(inp).flatten(0, 1).float(), tgt.flatten())))


def _perplexity_decoding(model: GPT, ids: torch.Tensor, prompt: int = 32) -> float:
    """`_perplexity` as generation computes it: each 64-token window's first `prompt` tokens prefilled into
    the model's KV cache (of dtype GPT.kv_dtype), the rest fed one token per step (the decode kernels)."""
    x = ids[: len(ids) // 64 * 64 + 1]
    inp, tgt = x[:-1].view(-1, 64), x[1:].view(-1, 64)
    nll = 0.0
    with torch.inference_mode():
        for rows, targets in zip(inp.split(kernels.DEFAULT_ROWS), tgt.split(kernels.DEFAULT_ROWS)):
            cache = model.new_cache(len(rows), 64)
            logits = [model(rows[:, :prompt], 0, cache)]
            logits += [model(rows[:, t:t + 1], t, cache) for t in range(prompt, 64)]
            nll += float(F.cross_entropy(torch.cat(logits, 1).flatten(0, 1).float(), targets.flatten(), reduction="sum"))
    return math.exp(nll / tgt.numel())


def test_int8_perplexity_within_one_percent_of_fp32(tmp_path):
    text = "".join((ROOT / "quill" / name).read_text() for name in ("model.py", "generate.py", "weights.py"))
    split = int(len(text) * 0.9)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is faster, and robust on a busy machine
    try:
        model, tok = _train_char_model(text[:split])
        held_out = torch.tensor(tok.encode("".join(c for c in text[split:] if c in text[:split])))
        fp32 = _perplexity(model, held_out)
        fp32_decoding = _perplexity_decoding(model, held_out)
        int8 = _perplexity(quantize_model(model), held_out)
        model.kv_dtype = torch.bfloat16  # what quill.load gives an int8 model
        int8_decoding = _perplexity_decoding(model, held_out)
    finally:
        torch.set_num_threads(threads)
    assert fp32 < tok.vocab_size / 4, f"training did not take (perplexity {fp32:.2f}, vocab {tok.vocab_size})"
    print(f"perplexity fp32 {fp32:.4f}, int8 {int8:.4f} ({(int8 - fp32) / fp32:+.3%}), "
          f"int8 decoding with a bf16 KV cache {int8_decoding:.4f} ({(int8_decoding - fp32) / fp32:+.3%})")
    assert abs(fp32_decoding - fp32) / fp32 <= 1e-4, (fp32, fp32_decoding)  # two paths, one quantity
    assert abs(int8 - fp32) / fp32 <= 0.01, (fp32, int8)
    assert abs(int8_decoding - fp32) / fp32 <= 0.01, (fp32, int8_decoding)


@pytest.mark.skipif(not (ROOT / "quill" / "models" / "shakespeare" / "config.json").exists(),
                    reason="the bundled model is not in this checkout")
def test_bundled_model_int8_and_bf16_perplexity_within_one_percent_of_fp32(one_thread, monkeypatch):
    """The bundled character model scored on Shakespeare (256-token windows: the prefill paths, Quill's int8 GEMM
    for int8), and again with every int8 product of many rows, the head's too, on the u8 GEMM where the kernels
    have it (8-bit activations: the most rounding the path tuner may choose)."""
    text = (ROOT / "bench" / "data" / "quality.txt").read_text()
    fp32 = quill.load("shakespeare").score(text).perplexity
    for kw in (dict(dtype="bfloat16"), dict(quantize="int8")):
        assert abs(quill.load("shakespeare", **kw).score(text).perplexity - fp32) / fp32 <= 0.01, kw
    if kernels.has_gemm_u8i8():
        monkeypatch.setattr(Int8Linear, "_panel_gemm", Int8Linear._u8_gemm)  # the default beyond DEFAULT_ROWS
        u8 = quill.load("shakespeare", quantize="int8").score(text).perplexity
        assert abs(u8 - fp32) / fp32 <= 0.01, (fp32, u8)


def test_the_head_keeps_int16_activations():
    """The u8 GEMM may serve every int8 projection but the head, whose outputs are the logits (an int8 checkpoint
    loaded: test_save_load_round_trip_is_exact)."""
    model = quantize_model(random_model(TINY))
    exact = [m for m in model.modules() if isinstance(m, Int8Linear) and not m.u8_inputs]
    assert exact == [model.lm_head] and sum(isinstance(m, Int8Linear) for m in model.modules()) > 2
