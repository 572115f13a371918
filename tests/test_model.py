"""The engine against transformers: logits, KV-cached decoding, greedy generation and checkpoints."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel

from quill.errors import CheckpointError, ConfigError
from quill.model import GPTConfig
from quill.weights import load_model, save_model

CONFIGS = {
    "tiny-odd": dict(n_embd=48, n_head=3, n_layer=2, n_positions=40, vocab_size=101),
    "untied-gelu": dict(n_embd=64, n_head=4, n_layer=3, n_positions=64, vocab_size=257,
                        tie_word_embeddings=False, activation_function="gelu"),
    "relu-layer-scaled": dict(n_embd=32, n_head=2, n_layer=3, n_positions=48, vocab_size=77,
                              activation_function="relu", scale_attn_by_inverse_layer_idx=True, n_inner=80),
    "unscaled-upcast-tanh": dict(n_embd=40, n_head=5, n_layer=2, n_positions=32, vocab_size=90,
                                 activation_function="gelu_pytorch_tanh", scale_attn_weights=False,
                                 reorder_and_upcast_attn=True, layer_norm_epsilon=1e-3),
}


def make_hf(tmp_path, name: str, seed: int = 0, **overrides) -> tuple[GPT2LMHeadModel, str]:
    """A random-initialised transformers GPT-2 saved as a checkpoint folder."""
    torch.manual_seed(seed)
    kw = {**CONFIGS[name], **overrides}
    hf = GPT2LMHeadModel(GPT2Config(bos_token_id=0, eos_token_id=0, **kw)).eval()
    folder = tmp_path / name
    hf.save_pretrained(folder)
    return hf, str(folder)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


@pytest.mark.parametrize("name", CONFIGS)
def test_logits_match_transformers(tmp_path, name):
    hf, folder = make_hf(tmp_path, name)
    model = load_model(folder)
    n_pos = CONFIGS[name]["n_positions"]
    for length in (1, 7, n_pos):
        x = torch.randint(0, CONFIGS[name]["vocab_size"], (2, length))
        with torch.no_grad():
            assert rel_err(hf(x).logits, model(x)) <= 1e-5, (name, length)


@pytest.mark.parametrize("name", ["tiny-odd", "untied-gelu"])
def test_kv_cache_matches_full_forward_up_to_context(tmp_path, name):
    hf, folder = make_hf(tmp_path, name)
    model = load_model(folder)
    n_pos = CONFIGS[name]["n_positions"]
    x = torch.randint(0, CONFIGS[name]["vocab_size"], (1, n_pos))
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache()
        steps = [model(x[:, :3], 0, cache)]  # prefill, then one token at a time to the end of the context
        steps += [model(x[:, t:t + 1], t, cache) for t in range(3, n_pos)]
    assert rel_err(full, torch.cat(steps, 1)) <= 1e-5
    with pytest.raises(ValueError, match="context"):
        model(x[:, :1], n_pos, cache)


def test_ragged_batch_matches_rows_alone(tmp_path):
    _, folder = make_hf(tmp_path, "tiny-odd")
    model = load_model(folder)
    x = torch.randint(0, 101, (3, 20))
    lengths = [4, 11, 17]
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(3)
        for r, n in enumerate(lengths):
            model(x[r:r + 1, :n], 0, cache.rows(slice(r, r + 1)))
        step = model(torch.stack([x[r, n] for r, n in enumerate(lengths)])[:, None], torch.tensor(lengths), cache)
    for r, n in enumerate(lengths):
        assert rel_err(full[r, n], step[r, 0]) <= 1e-5


def test_prompt_longer_than_context_is_refused(tmp_path):
    import quill
    from quill.errors import ContextLengthError

    _, folder = make_hf(tmp_path, "tiny-odd")
    shutil.copy(_char_tokenizer(tmp_path, 101), folder)
    engine = quill.load(folder)
    with pytest.raises(ContextLengthError, match="41"):
        engine.generate(list(range(41)), max_tokens=1)
    with pytest.raises(ContextLengthError, match="max_tokens"):
        engine.generate(list(range(30)), max_tokens=20)


def _char_tokenizer(tmp_path, vocab: int):
    """A character tokenizer with `vocab` symbols, saved as tokenizer.json; returns the file path."""
    from quill.tokenizer import Tokenizer

    chars = "".join(chr(0x100 + i) for i in range(vocab))
    d = tmp_path / "tok"
    Tokenizer.characters(chars).save(d)
    return d / "tokenizer.json"


@pytest.mark.parametrize("name", ["tiny-odd", "untied-gelu"])
def test_greedy_generation_equals_transformers(tmp_path, name):
    import quill

    hf, folder = make_hf(tmp_path, name, pad_token_id=0)
    shutil.copy(_char_tokenizer(tmp_path, CONFIGS[name]["vocab_size"]), folder)
    n_pos = CONFIGS[name]["n_positions"]
    prompt = [5, 9, 2, 33]
    new = min(64, n_pos - len(prompt))
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=new, min_new_tokens=new,
                          eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
    out = quill.load(folder).generate(prompt, max_tokens=new, temperature=0, ignore_eos=True)
    assert out.tokens == ref
    assert out.finish_reason == "length"
    assert out.usage.prompt_tokens == len(prompt) and out.usage.completion_tokens == new


def test_quill_checkpoint_loads_in_transformers_and_back(tmp_path):
    hf, folder = make_hf(tmp_path, "untied-gelu")
    model = load_model(folder)
    save_model(model, tmp_path / "quill-out")
    again = GPT2LMHeadModel.from_pretrained(tmp_path / "quill-out").eval()
    x = torch.randint(0, 257, (1, 30))
    with torch.no_grad():
        assert rel_err(hf(x).logits, again(x).logits) == 0.0
        assert rel_err(model(x), load_model(tmp_path / "quill-out")(x)) == 0.0


def test_sharded_and_bin_checkpoints(tmp_path):
    hf, folder = make_hf(tmp_path, "tiny-odd")
    ref = load_model(folder)
    x = torch.randint(0, 101, (1, 12))
    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").exists()
    binary = tmp_path / "bin"
    binary.mkdir()
    shutil.copy(sharded / "config.json", binary)
    torch.save({f"transformer.{k}" if not k.startswith("lm_head") else k: v.clone()
                for k, v in hf.transformer.state_dict().items()}, binary / "pytorch_model.bin")
    for path in (sharded, binary):
        with torch.no_grad():
            assert torch.equal(ref(x), load_model(path)(x))


def test_transformer_prefix_is_optional(tmp_path):
    _, folder = make_hf(tmp_path, "tiny-odd")
    tensors = load_file(f"{folder}/model.safetensors")
    save_file({k.removeprefix("transformer."): v for k, v in tensors.items()}, f"{folder}/model.safetensors",
              metadata={"format": "pt"})
    x = torch.randint(0, 101, (1, 5))
    with torch.no_grad():
        assert load_model(folder)(x).shape == (1, 5, 101)


def test_corrupt_inputs_get_their_own_errors(tmp_path):
    _, folder = make_hf(tmp_path, "tiny-odd")
    weights = f"{folder}/model.safetensors"
    good = open(weights, "rb").read()
    cfg = json.loads(open(f"{folder}/config.json").read())

    open(weights, "wb").write(good[: len(good) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as e:
        load_model(folder)
    assert e.value.file == "model.safetensors"
    open(weights, "wb").write(good)

    tensors = load_file(weights)
    tensors["transformer.h.0.mlp.c_fc.weight"] = torch.zeros(48, 100)
    save_file(tensors, weights)
    with pytest.raises(CheckpointError, match=r"h\.0\.mlp\.c_fc\.weight.*shape"):
        load_model(folder)
    del tensors["transformer.h.0.mlp.c_fc.weight"]
    save_file(tensors, weights)
    with pytest.raises(CheckpointError, match=r"h\.0\.mlp\.c_fc\.weight.*missing"):
        load_model(folder)
    tensors = load_file(f"{tmp_path}/tiny-odd/model.safetensors")
    open(weights, "wb").write(good)
    tensors = load_file(weights)
    tensors["transformer.h.9.extra"] = torch.zeros(1)
    save_file(tensors, weights)
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'transformer\.h\.9\.extra'"):
        load_model(folder)
    open(weights, "wb").write(good)

    for key, value, field in [("n_head", None, "n_head"), ("activation_function", "swish", "activation_function"),
                              ("model_type", "llama", "model_type"), ("rotary_dim", 8, "rotary_dim")]:
        broken = dict(cfg)
        if value is None:
            del broken[key]
        else:
            broken[key] = value
        open(f"{folder}/config.json", "w").write(json.dumps(broken))
        with pytest.raises(ConfigError) as e:
            load_model(folder)
        assert e.value.field == field and field in str(e.value)
    open(f"{folder}/config.json", "w").write("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_model(folder)


def test_config_round_trips_through_transformers():
    cfg = GPTConfig.from_hf(GPT2Config(**CONFIGS["unscaled-upcast-tanh"]).to_dict())
    assert GPTConfig.from_hf(cfg.to_hf()) == cfg
    assert cfg.num_params() == sum(p.numel() for p in GPT2LMHeadModel(GPT2Config(**cfg.to_hf())).parameters())
