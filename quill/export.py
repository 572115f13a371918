"""Exporters: GGUF (llama.cpp's GPT-2 layout) and ONNX (with past keys and values).

`quill export gguf MODEL OUT.gguf [--type f32|f16|q8_0]` writes what llama.cpp's convert_hf_to_gguf.py writes
for a `GPT2LMHeadModel`: architecture `gpt2`, its hyper-parameters (context length, embedding length,
feed-forward length, heads, layer-norm epsilon, file type), the byte-level BPE vocabulary (token strings,
token types, merges, bos/eos ids, pre-tokenizer `gpt-2`) and the tensors under llama.cpp's names, weights
as [out, in] matrices (HF Conv1D weights transposed), the tied head duplicated as `output.weight`. With
f16/q8_0, 2-D matrices are converted (q8_0 falls back to f16 for rows not a multiple of 32) and 1-D
tensors (norms, biases) stay f32, as llama.cpp does.

`quill export onnx MODEL DIR` writes DIR/model.onnx (+ DIR/model.onnx.data for the weights) and the
tokenizer files. Inputs: `input_ids` int64 [batch, seq] and, per layer i, `past_key_values.{i}.key` /
`.value` float32 [batch, n_head, past, head_dim] (past = 0 for the first call); outputs: `logits`
[batch, seq, vocab] and `present.{i}.key` / `.value` [batch, n_head, past + seq, head_dim]. Positions run
on from `past`, so a prefill is followed by decode steps that feed back the presents. No attention mask:
rows of a batch share one length.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from quill.cli_flags import MODEL_HELP
from quill.errors import InvalidParameter
from quill.model import GPT

GGUF_TYPES = ("f32", "f16", "q8_0")


def _load_float_model(model_path: str | Path) -> tuple[GPT, Path]:
    from quill.quantize import quantization_config
    from quill.resolve import resolve
    from quill.weights import load_model

    path = resolve(model_path)
    if quantization_config(path) is not None:
        raise InvalidParameter(f"{path} is an int8 Quill checkpoint; export the float model it came from "
                               "(GGUF q8_0 is llama.cpp's own int8)", "model")
    return load_model(path, torch.float32), path


# ---- GGUF -------------------------------------------------------------------------------------------------

def _gguf_tensors(model: GPT) -> list[tuple[str, Tensor]]:
    """(llama.cpp name, float32 tensor) pairs, weights as [out, in]."""
    tr = model.transformer
    out = [("token_embd.weight", tr.wte.weight), ("position_embd.weight", tr.wpe.weight)]
    for i, b in enumerate(tr.h):
        p = f"blk.{i}."
        out += [(p + "attn_norm.weight", b.ln_1.weight), (p + "attn_norm.bias", b.ln_1.bias),
                (p + "attn_qkv.weight", b.attn.c_attn.weight), (p + "attn_qkv.bias", b.attn.c_attn.bias),
                (p + "attn_output.weight", b.attn.c_proj.weight), (p + "attn_output.bias", b.attn.c_proj.bias),
                (p + "ffn_norm.weight", b.ln_2.weight), (p + "ffn_norm.bias", b.ln_2.bias),
                (p + "ffn_up.weight", b.mlp.c_fc.weight), (p + "ffn_up.bias", b.mlp.c_fc.bias),
                (p + "ffn_down.weight", b.mlp.c_proj.weight), (p + "ffn_down.bias", b.mlp.c_proj.bias)]
    out += [("output_norm.weight", tr.ln_f.weight), ("output_norm.bias", tr.ln_f.bias),
            ("output.weight", model.lm_head.weight)]  # a tied head is written again, as convert_hf_to_gguf does
    return [(n, t.detach().float().contiguous()) for n, t in out]


def _bpe_vocab(tokenizer, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """Token strings, llama.cpp token types and merges ("a b") of a byte-level BPE tokenizer."""
    import gguf

    spec = json.loads(tokenizer.backend.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise InvalidParameter(f"GGUF export needs a byte-level BPE tokenizer (GPT-2's); this one is "
                               f"{model.get('type')!r}", "model")
    vocab: dict[str, int] = dict(model["vocab"])
    special = set()
    for added in spec.get("added_tokens", []):
        vocab[added["content"]] = added["id"]
        if added.get("special"):
            special.add(added["content"])
    reverse = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(vocab_size):
        tok = reverse.get(i)
        if tok is None:
            tokens.append(f"[PAD{i}]")
            types.append(int(gguf.TokenType.UNUSED))
        else:
            tokens.append(tok)
            types.append(int(gguf.TokenType.CONTROL if tok in special else gguf.TokenType.NORMAL))
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return tokens, types, merges


def export_gguf(model_path: str | Path, out: str | Path, type: str = "f16", name: str | None = None) -> Path:
    """Write a llama.cpp-loadable GGUF file for a GPT-2 checkpoint folder."""
    import gguf

    from quill.tokenizer import Tokenizer

    if type not in GGUF_TYPES:
        raise InvalidParameter(f"GGUF type must be one of {', '.join(GGUF_TYPES)}, got {type!r}", "type")
    model, path = _load_float_model(model_path)
    cfg = model.config
    if cfg.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
        raise InvalidParameter(f"llama.cpp's gpt2 uses tanh-GELU; activation {cfg.activation_function!r} "
                               "cannot be exported", "model")
    if cfg.scale_attn_by_inverse_layer_idx or not cfg.scale_attn_weights:
        raise InvalidParameter("llama.cpp's gpt2 scales attention by 1/sqrt(head_dim) only", "model")
    tok = Tokenizer.load(path)
    tokens, types, merges = _bpe_vocab(tok, cfg.vocab_size)
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[type]
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    writer = gguf.GGUFWriter(str(tmp), "gpt2")
    try:
        writer.add_name(name or path.name)
        writer.add_block_count(cfg.n_layer)
        writer.add_context_length(cfg.n_positions)
        writer.add_embedding_length(cfg.n_embd)
        writer.add_feed_forward_length(cfg.inner_dim)
        writer.add_head_count(cfg.n_head)
        writer.add_layer_norm_eps(cfg.layer_norm_epsilon)
        writer.add_file_type(int(ftype))
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("gpt-2")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        for key, setter in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id)):
            token = tok.bos_token_id if key == "bos_token_id" else tok.eos_token_id
            if token is not None:
                setter(token)
        writer.add_add_bos_token(False)
        for tname, t in _gguf_tensors(model):
            data = t.numpy()
            if data.ndim == 1 or type == "f32":
                writer.add_tensor(tname, data.astype(np.float32))
            elif type == "q8_0" and data.shape[-1] % 32 == 0:
                writer.add_tensor(tname, gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0),
                                  raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            else:
                writer.add_tensor(tname, data.astype(np.float16))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def read_gguf_tensors(path: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of a GGUF file as float32 numpy arrays in [out, in] layout (dequantised)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    out = {}
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type) if t.tensor_type not in (
            gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16) else np.asarray(t.data)
        shape = tuple(int(d) for d in reversed(t.shape))  # GGUF lists dimensions innermost first
        out[t.name] = np.asarray(data, dtype=np.float32).reshape(shape)
    return out


# ---- ONNX -------------------------------------------------------------------------------------------------

class _OnnxGPT(nn.Module):
    """GPT-2 with explicit past/present tensors (concatenation instead of the preallocated cache)."""

    def __init__(self, model: GPT, last_only: bool = False):
        super().__init__()
        self.model, self.last_only = model, last_only

    def forward(self, input_ids: Tensor, *past: Tensor) -> tuple[Tensor, ...]:
        m, cfg = self.model, self.model.config
        tr = m.transformer
        B, T = input_ids.shape
        P = past[0].shape[2]
        H, D, C = cfg.n_head, cfg.head_dim, cfg.n_embd
        positions = torch.arange(T, device=input_ids.device) + P
        x = tr.wte(input_ids) + tr.wpe(positions)
        keys = torch.arange(T, device=input_ids.device)[None, :] + P  # query i sits at P + i
        allowed = torch.arange(P + T, device=input_ids.device)[None, :] <= keys.transpose(0, 1)  # [T, P+T]
        presents: list[Tensor] = []
        for i, block in enumerate(tr.h):
            attn = block.attn
            q, k, v = attn.c_attn(block.ln_1(x)).split(C, dim=-1)
            q = q.view(B, T, H, D).transpose(1, 2)
            k = torch.cat([past[2 * i], k.view(B, T, H, D).transpose(1, 2)], dim=2)
            v = torch.cat([past[2 * i + 1], v.view(B, T, H, D).transpose(1, 2)], dim=2)
            presents += [k, v]
            scores = (q @ k.transpose(-1, -2)) * attn.scale
            scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
            y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, T, C)
            x = x + attn.c_proj(y)
            x = x + block.mlp(block.ln_2(x))
        x = tr.ln_f(x)
        return (m.lm_head(x[:, -1:] if self.last_only else x), *presents)


def onnx_names(n_layer: int) -> tuple[list[str], list[str]]:
    ins = ["input_ids"] + [f"past_key_values.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]
    outs = ["logits"] + [f"present.{i}.{kv}" for i in range(n_layer) for kv in ("key", "value")]
    return ins, outs


def export_onnx(model_path: str | Path, out_dir: str | Path, opset: int = 18, last_logits_only: bool = False) -> Path:
    """Write DIR/model.onnx (weights in DIR/model.onnx.data) and the tokenizer files; returns the .onnx path.

    `last_logits_only` computes logits for the final position only ([batch, 1, vocab]), as a generation
    loop needs (the benchmark uses it so that a 512-token prefill does not pay for 511 unused logits).
    """
    from quill.quantize import TOKENIZER_FILES

    model, path = _load_float_model(model_path)
    cfg = model.config
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    wrapper = _OnnxGPT(model, last_logits_only).eval()
    ins, outs = onnx_names(cfg.n_layer)
    ids = torch.zeros(1, 3, dtype=torch.long)
    past = [torch.zeros(1, cfg.n_head, 2, cfg.head_dim) for _ in range(2 * cfg.n_layer)]
    dynamic_axes = {"input_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}}
    for name in ins[1:]:
        dynamic_axes[name] = {0: "batch", 2: "past"}
    for name in outs[1:]:
        dynamic_axes[name] = {0: "batch", 2: "total"}
    target = out_dir / "model.onnx"
    with torch.no_grad():
        torch.onnx.export(wrapper, (ids, *past), str(target), input_names=ins, output_names=outs,
                          dynamic_axes=dynamic_axes, opset_version=opset, dynamo=False, do_constant_folding=True)
    _externalise(target)
    for name in TOKENIZER_FILES + ("config.json",):
        if (path / name).is_file():
            shutil.copyfile(path / name, out_dir / name)
    return target


def _externalise(target: Path) -> None:
    """Keep weights in model.onnx.data beside the graph (ONNX protobufs are limited to 2 GB)."""
    import onnx

    proto = onnx.load(str(target))
    data = target.with_name(target.name + ".data")
    data.unlink(missing_ok=True)
    onnx.save_model(proto, str(target), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data.name, size_threshold=1024)


def quantize_onnx_int8(model_onnx: str | Path, out: str | Path) -> Path:
    """onnxruntime's dynamic int8 quantisation (int8 weights, int8 activations per call) of an exported model."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    quantize_dynamic(str(model_onnx), str(out), weight_type=QuantType.QInt8, use_external_data_format=True)
    return out


# ---- command line -----------------------------------------------------------------------------------------

def cmd_export(args: argparse.Namespace) -> None:
    if args.format == "gguf":
        out = export_gguf(args.model, args.out, args.type)
    else:
        out = export_onnx(args.model, args.out)
    print(json.dumps({"format": args.format, "out": str(out), "bytes": _size(Path(args.out))}))


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def register(sub) -> None:
    p = sub.add_parser("export", help="export a model to GGUF (llama.cpp) or ONNX (onnxruntime)")
    fmt = p.add_subparsers(dest="format", required=True)
    g = fmt.add_parser("gguf", help="a llama.cpp GGUF file (gpt2 architecture)")
    g.add_argument("model", help=MODEL_HELP)
    g.add_argument("out", help="output .gguf file")
    g.add_argument("--type", choices=GGUF_TYPES, default="f16", help="weight type (default f16)")
    g.set_defaults(func=cmd_export)
    o = fmt.add_parser("onnx", help="an ONNX model with past key/value inputs and outputs")
    o.add_argument("model", help=MODEL_HELP)
    o.add_argument("out", help="output folder (model.onnx, model.onnx.data, tokenizer)")
    o.set_defaults(func=cmd_export)


__all__ = ["export_gguf", "export_onnx", "read_gguf_tensors", "quantize_onnx_int8", "onnx_names", "GGUF_TYPES"]

