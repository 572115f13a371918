"""GGUF and ONNX exports: read back and compared with Quill's own tensors and logits."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from quill.cli import main as cli_main
from quill.errors import InvalidParameter
from quill.export import _gguf_tensors, export_gguf, export_onnx, onnx_names, read_gguf_tensors
from quill.weights import load_model

gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def gguf_files(tiny_gpt2_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("gguf")
    return {t: export_gguf(tiny_gpt2_dir, out / f"tiny-{t}.gguf", t) for t in ("f32", "f16", "q8_0")}


def _field(reader, key):
    f = reader.fields[key]
    if f.types[0] == gguf.GGUFValueType.STRING:
        return bytes(f.parts[f.data[0]]).decode()
    if f.types[0] == gguf.GGUFValueType.ARRAY:
        return len(f.data)
    return f.parts[f.data[0]][0]


def test_gguf_metadata_matches_llama_cpp_gpt2_layout(gguf_files, tiny_gpt2_dir):
    model = load_model(tiny_gpt2_dir)
    cfg = model.config
    reader = gguf.GGUFReader(str(gguf_files["f16"]))
    assert _field(reader, "general.architecture") == "gpt2"
    assert _field(reader, "gpt2.context_length") == cfg.n_positions
    assert _field(reader, "gpt2.embedding_length") == cfg.n_embd
    assert _field(reader, "gpt2.feed_forward_length") == cfg.inner_dim
    assert _field(reader, "gpt2.block_count") == cfg.n_layer
    assert _field(reader, "gpt2.attention.head_count") == cfg.n_head
    assert _field(reader, "general.file_type") == int(gguf.LlamaFileType.MOSTLY_F16)
    assert _field(reader, "tokenizer.ggml.model") == "gpt2"
    assert _field(reader, "tokenizer.ggml.pre") == "gpt-2"
    assert _field(reader, "tokenizer.ggml.tokens") == cfg.vocab_size == 50257
    assert _field(reader, "tokenizer.ggml.merges") == 50000
    assert _field(reader, "tokenizer.ggml.eos_token_id") == 50256
    tokens = reader.fields["tokenizer.ggml.tokens"]
    assert bytes(tokens.parts[tokens.data[262]]).decode() == "\u0120the"  # byte-level BPE strings, as in vocab.json
    names = {t.name for t in reader.tensors}
    assert {"token_embd.weight", "position_embd.weight", "output.weight", "output_norm.bias",
            "blk.1.attn_qkv.weight", "blk.1.ffn_down.bias"} <= names
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types["blk.0.attn_qkv.weight"] == gguf.GGMLQuantizationType.F16
    assert types["blk.0.attn_qkv.bias"] == gguf.GGMLQuantizationType.F32  # 1-D tensors stay f32


@pytest.mark.parametrize("kind", ["f32", "f16", "q8_0"])
def test_gguf_tensors_read_back_equal_quills(gguf_files, tiny_gpt2_dir, kind):
    model = load_model(tiny_gpt2_dir)
    got = read_gguf_tensors(gguf_files[kind])
    ref = dict(_gguf_tensors(model))
    assert set(got) == set(ref)
    assert got["blk.0.attn_qkv.weight"].shape == tuple(model.transformer.h[0].attn.c_attn.weight.shape)  # [out, in]
    for name, want in ref.items():
        want = want.numpy()
        if kind == "f32" or want.ndim == 1:
            np.testing.assert_array_equal(got[name], want, err_msg=name)
        elif kind == "f16":
            np.testing.assert_array_equal(got[name], want.astype(np.float16).astype(np.float32), err_msg=name)
        else:  # q8_0: blocks of 32, one fp16 scale d = max|x|/127 each: |error| <= d/2 + 127 * d * 2^-11
            blocks = want.reshape(-1, 32)
            bound = np.abs(blocks).max(axis=1, keepdims=True) / 127 * 0.57 + 1e-6
            assert (np.abs(got[name].reshape(-1, 32) - blocks) <= bound).all(), name


def test_gguf_refuses_what_llama_cpp_cannot_run(tiny_model_dir, tmp_path):
    with pytest.raises(InvalidParameter, match="BPE"):
        export_gguf(tiny_model_dir, tmp_path / "chars.gguf")  # a character tokenizer
    with pytest.raises(InvalidParameter, match="type"):
        export_gguf(tiny_model_dir, tmp_path / "x.gguf", "q4_k")


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python not installed")
@pytest.mark.parametrize("kind,tol", [("f32", 2e-2), ("f16", 5e-2), ("q8_0", 1e-1)])
def test_gguf_loads_in_llama_cpp_with_quills_logits(gguf_files, tiny_gpt2_dir, kind, tol):
    import llama_cpp

    model = load_model(tiny_gpt2_dir)
    ids = [464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13]
    llm = llama_cpp.Llama(model_path=str(gguf_files[kind]), n_ctx=64, logits_all=True, verbose=False,
                          n_threads=1)
    llm.eval(ids)
    got = np.asarray(llm.scores[: len(ids)], dtype=np.float32)
    with torch.inference_mode():
        want = model(torch.tensor([ids]))[0].numpy()
    # ggml's GELU is a table lookup in fp16, so even f32 agrees to ~1e-3 of the logit range, not bitwise
    assert np.abs(got - want).max() / np.abs(want).max() <= tol
    assert (got.argmax(-1) == want.argmax(-1)).mean() >= 0.9
    assert llm.tokenize(b"The quick brown fox", add_bos=False) == ids[:4]


def test_onnx_prefill_then_decode_matches_quill(tiny_gpt2_dir, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    path = export_onnx(tiny_gpt2_dir, tmp_path / "onnx")
    assert (tmp_path / "onnx" / "model.onnx.data").is_file() and (tmp_path / "onnx" / "tokenizer.json").is_file()
    model = load_model(tiny_gpt2_dir)
    cfg = model.config
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ins, outs = onnx_names(cfg.n_layer)
    assert [i.name for i in sess.get_inputs()] == ins and [o.name for o in sess.get_outputs()] == outs
    ids = np.array([[464, 2068, 7586, 21831, 18045, 625, 262], [13, 11, 262, 3290, 318, 257, 1049]], dtype=np.int64)
    with torch.inference_mode():
        want = model(torch.from_numpy(ids)).numpy()
    feed = {"input_ids": ids[:, :5]}
    feed.update({n: np.zeros((2, cfg.n_head, 0, cfg.head_dim), np.float32) for n in ins[1:]})
    out = sess.run(None, feed)
    np.testing.assert_allclose(out[0], want[:, :5], atol=1e-4 * np.abs(want).max())
    for step in (5, 6):  # two decode steps, each feeding back the presents
        feed = {"input_ids": ids[:, step:step + 1], **dict(zip(ins[1:], out[1:]))}
        out = sess.run(None, feed)
        assert out[1].shape == (2, cfg.n_head, step + 1, cfg.head_dim)
        np.testing.assert_allclose(out[0], want[:, step:step + 1], atol=1e-4 * np.abs(want).max())


def test_export_cli(tiny_gpt2_dir, tmp_path, capsys):
    assert cli_main(["export", "gguf", str(tiny_gpt2_dir), str(tmp_path / "m.gguf"), "--type", "q8_0"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["format"] == "gguf" and report["bytes"] == (tmp_path / "m.gguf").stat().st_size
    reader = gguf.GGUFReader(str(tmp_path / "m.gguf"))
    assert {t.name: t.tensor_type for t in reader.tensors}["blk.0.ffn_up.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert cli_main(["export", "gguf", "no-such-model", str(tmp_path / "x.gguf")]) == 2
