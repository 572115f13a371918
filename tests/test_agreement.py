"""Teacher-forced top-1 agreement over 512 positions (quill/agreement.py), and the floors bf16 and int8 reach.

The floors are for a random GPT-2-initialised model (std 0.02: nearly flat logits, where top-1 flips at the
smallest perturbation) read teacher-forced on a fixed random token sequence, decoded as generation does.
Measured when written: bf16 as quill.load makes it on the CPU (bf16 matrices, fp32 activations, bf16 KV
cache) 99.2%, where an all-bf16 model (bf16 residual stream) reached 97.9%; int8 96.9% (96.5% when the
input side read the head's int8 rows), the same 96.9% in one forward on Quill's int8 GEMM (fbgemm's
7-bit activations: 89.3%). Floors: bf16 98.5% (above what the bf16 residual stream reaches), int8 95% on
both paths (the issue's bar for the 124M model is 94.3%; a tiny model's 512 positions move by 0.2% a flip).
"""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2LMHeadModel

import quill
from quill.agreement import position_logits, top1, top1_agreement

from quill.model import GPT, GPTConfig
from quill.tokenizer import Tokenizer
from quill.weights import save_model

T = 512
FLOORS = {"bf16": 0.985, "int8": 0.95}


@pytest.fixture(scope="module")
def flat_model(tmp_path_factory, one_thread):
    """A random GPT-2 with 2048 tokens (every matrix N(0, 0.02), as GPT-2's initialisation draws most of
    them), saved as a checkpoint, and a random sequence of 512 of its tokens."""
    folder = tmp_path_factory.mktemp("agreement")
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=2048, n_embd=256, n_layer=4, n_head=8, n_positions=T, bos_token_id=0,
                          eos_token_id=0))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.02)
    save_model(model, folder)
    Tokenizer.characters("ab").save(folder)  # quill.load wants one; the tests feed token ids
    ids = torch.randint(0, model.config.vocab_size, (T,), generator=torch.Generator().manual_seed(1))
    return folder, ids


def test_position_logits_equal_cache_free_computations(flat_model):
    """Both ways through the KV cache give, at every position, the logits of one cache-free forward of the
    whole sequence (causal: position t sees tokens 0..t) and, at positions spread over the 512, of a forward
    of the prefix ending there; Quill fp32 picks transformers fp32's token at every position."""
    folder, ids = flat_model
    model = quill.load(folder).model
    sampled = [0, 1, 31, 32, 33, 100, 255, 256, 400, 510, 511]
    with torch.inference_mode():
        whole = model(ids[None])[0]
        prefixes = torch.stack([model(ids[None, :t + 1], last_only=True)[0, -1] for t in sampled])
        hf = GPT2LMHeadModel.from_pretrained(folder).eval()(ids[None]).logits[0]
    torch.testing.assert_close(whole[sampled], prefixes, atol=1e-4, rtol=1e-4)
    for mode in ("prefill", "decode"):
        got = position_logits(model, ids, mode)
        assert got.shape == (T, model.config.vocab_size)
        torch.testing.assert_close(got, whole, atol=1e-4, rtol=1e-4)
        assert top1_agreement(top1(got), top1(hf)) == 1.0


def test_top1_agreement_counts_equal_positions():
    assert top1_agreement([1, 2, 3, 4], [1, 0, 3, 0]) == 0.5
    with pytest.raises(ValueError):
        top1_agreement([1, 2], [1])
    with pytest.raises(ValueError):
        position_logits(None, [1, 2], "sideways")


@pytest.mark.parametrize(("precision", "mode"), [("bf16", "decode"), ("int8", "decode"), ("int8", "prefill")])
def test_agreement_with_fp32_over_512_positions_reaches_its_floor(flat_model, precision, mode):
    """Both int8 paths reach the floor: decode steps (the int16-activation kernels) and the 512 tokens in one
    forward (Quill's int8 GEMM, the same int16 activations; fbgemm's 7-bit ones reached 89.3% here)."""
    folder, ids = flat_model
    kw = dict(dtype="bfloat16") if precision == "bf16" else dict(quantize="int8")
    want = top1(position_logits(quill.load(folder).model, ids))
    got = top1(position_logits(quill.load(folder, **kw).model, ids, mode))
    agreement = top1_agreement(got, want)
    print(f"{precision} ({mode}) top-1 agreement with fp32 over {T} positions: {agreement:.2%}")
    assert agreement >= FLOORS[precision]
