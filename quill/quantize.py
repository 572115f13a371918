"""Int8 weight-only quantisation as a module swap, and the int8 checkpoint format.

Every `nn.Linear` of a GPT (the fused qkv, attention output, both MLP projections and the lm_head) becomes an
`Int8Linear`: int8 weights [out, in] with one fp32 scale per output channel (symmetric, no zero point:
`w ~= q * scale[:, None]`, `q` in [-127, 127], `scale = max|w_row| / 127`). A tied token embedding is kept
apart from the int8 head, in float (bf16 under fp32 activations): the rows the input side gathers are not
rounded to int8 (teacher-forced top-1 over 512 positions +0.8 points, docs/performance.md; one row read a
token, so no speed is lost, at 2 bytes a weight of memory). Activations, LayerNorms, biases and the
position embedding stay in the model's dtype.

Decode steps (a few rows at a time) run on `quill.kernels`, which read 1 byte per weight and meet int16
activations (one scale per row: near-exact); longer inputs (prefill) run on whichever is fastest on this
machine for their shape (quill.kernels.tune): those kernels, Quill's int8 GEMM (the same int16 activations,
weights repacked into column panels; the default for long inputs) or the dequantised fp32 GEMM. fbgemm's int8
GEMM, activations quantised per tensor to 7-bit uint8 as ONNX Runtime's and transformers' dynamic int8 do,
serves long inputs only without the kernels, or as a timed candidate with `QUILL_INT8_GEMM=1` (then chosen
only where more than tune.INEXACT_MARGIN times faster: it costs accuracy); `QUILL_INT8_GEMM=0` takes it out
entirely (see docs/performance.md).

Checkpoint format (`quill quantize MODEL OUT --int8`, loaded by `quill.load(OUT)`): a folder with the model's
`config.json` plus a `quantization_config` entry, `model.safetensors` and the source's tokenizer files.
Tensor names are Hugging Face GPT-2 names. For each quantised layer:

    <layer>.weight        int8    [out_features, in_features]   (nn.Linear layout, NOT HF Conv1D's [in, out])
    <layer>.weight_scale  float32 [out_features]
    <layer>.bias          float   [out_features]                (the config's torch_dtype)

The head is `lm_head.weight` (int8 [vocab, n_embd]) with `lm_head.weight_scale` (float32 [vocab]), tied or
not, and `transformer.wte.weight` is float. Checkpoints written before the embedding was kept apart store
the tied head once as `transformer.wte.weight`/`weight_scale` (int8) and no `lm_head.*`: they load with the
embedding dequantised from it. LayerNorms and `transformer.wpe.weight` are float.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from quill import kernels
from quill.atomic import atomic_write
from quill.errors import CheckpointError, InvalidParameter
from quill.model import GPT, epilogue
from quill.weights import CONFIG_FILE, SAFETENSORS_FILE, load_config, read_tensors

QUANT_METHOD = "quill_int8"
MODES = ("int8",)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "chat_template.jinja", "generation_config.json", "added_tokens.json")


def quantize_weight(w: Tensor) -> tuple[Tensor, Tensor]:
    """Per-output-channel symmetric int8 of a [out, in] matrix: (q int8 [out, in], scale float32 [out])."""
    w32 = w.detach().float()
    amax = w32.abs().amax(dim=1)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q = torch.round(w32 / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale.contiguous()


def _int8_gemm_serves(x: Tensor) -> bool:
    """Whether fbgemm's int8 GEMM may serve a CPU inference input (QUILL_INT8_GEMM=0: never; Quill's int8 GEMM
    or the dequantised fp32 GEMM do)."""
    return (x.device.type == "cpu" and not (torch.is_grad_enabled() and x.requires_grad) and not kernels.observed()
            and os.environ.get("QUILL_INT8_GEMM", "") != "0"
            and torch.backends.quantized.engine in ("x86", "fbgemm"))


def _fbgemm_competes() -> bool:
    """Whether fbgemm's int8 GEMM is timed against Quill's exact paths (QUILL_INT8_GEMM=1). Off by default: its
    7-bit activations cost 7 points of top-1 agreement over 512 positions, and on AVX-512 VNNI it is about 2x
    Quill's int8 GEMM, so a speed margin would always take it (docs/performance.md, "Quality")."""
    return os.environ.get("QUILL_INT8_GEMM", "") == "1"


def _prepack(weight: Tensor, scale: Tensor, bias: Tensor | None) -> object:
    """fbgemm's packed form of an int8 [out, in] weight with per-output-channel scales (zero point 0)."""
    with warnings.catch_warnings():  # torch marks quantized tensors deprecated; fbgemm's GEMM still takes them
        warnings.simplefilter("ignore")
        qw = torch._make_per_channel_quantized_tensor(weight, scale.double(), torch.zeros_like(scale, dtype=torch.long), 0)
        return torch.ops.quantized.linear_prepack(qw, None if bias is None else bias.float())


class Int8Linear(nn.Module):
    """`y = (x @ q.T) * scale + bias` with int8 `q` [out, in] and fp32 per-output-channel `scale`."""

    fuses_epilogue = True  # forward takes act and residual (quill.model.fused)
    # Whether rows may be rounded to u8 (the row kernel's and the u8 GEMM's): not for the head (`keep_head_exact`),
    # whose outputs are the logits, where 8-bit inputs cost the most top-1 (docs/performance.md, "Quality")
    u8_inputs = True

    def __init__(self, weight: Tensor, scale: Tensor, bias: Tensor | None):
        super().__init__()
        if weight.dtype != torch.int8 or weight.dim() != 2 or scale.shape != weight.shape[:1]:
            raise ValueError("Int8Linear needs an int8 [out, in] weight and a [out] scale")
        self.out_features, self.in_features = weight.shape
        self.register_buffer("weight", weight.contiguous())
        self.register_buffer("weight_scale", scale.float().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().contiguous())
        self._packed = kernels.PackedCopy()  # fbgemm's packed weight, see _gemm
        self._panels = kernels.PackedCopy()  # the panels of _panel_gemm
        self._u8_panels = kernels.PackedCopy()  # the panels and row sums of _u8_gemm
        self._sums = kernels.PackedCopy()  # the row sums the row kernel's u8 rows take (kernel_args)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        q, scale = quantize_weight(linear.weight)
        return cls(q, scale, linear.bias)

    def kernel_args(self) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
        """(weight, scale, bias, sums) for quill.kernels.linear and the decode plan: sums, the weight's row sums
        (made once per weight), where rows may be rounded to u8 (`u8_inputs`, and the loaded kernels do), else
        None."""
        s = self.weight_scale
        u8 = self.u8_inputs and kernels.available() and kernels.u8_rows(self.in_features)
        sums = self._sums.get(kernels.identity(self.weight), lambda: kernels.row_sums(self.weight)) if u8 else None
        return self.weight, s if s.dtype == torch.float32 else s.float(), self.bias, sums

    def dequantized(self, dtype: torch.dtype) -> Tensor:
        """The weight as a float matrix [out, in] in `dtype`."""
        return (self.weight.to(torch.float32) * self.weight_scale.float()[:, None]).to(dtype)

    def forward(self, x: Tensor, act: str | None = None, residual: Tensor | None = None) -> Tensor:
        """`(residual +) act(x @ W.T * scale + b)` (as `quill.model.Linear`) on Quill's int8 decode kernel, its
        int8 GEMM (`_panel_gemm`), fbgemm's int8 GEMM or the dequantised GEMM: for several rows, whichever is
        fastest here (quill.kernels.project times them; fbgemm, whose 7-bit activations round more, only with
        QUILL_INT8_GEMM=1 and where clearly faster); without the kernels, fbgemm beyond DEFAULT_ROWS. On AVX-512
        VNNI (`u8_inputs`, unless QUILL_INT8_U8=0) the kernel rounds rows to u8, and the u8 GEMM is the one
        other candidate: both sum the same exact integers, so a row's result never depends on the rows batched
        with it nor on which of the two computed it."""
        w, s, b, sums = self.kernel_args()
        gemm = _int8_gemm_serves(x)
        # on u8 rows the kernel and the u8 GEMM give the same bits, and the int16 paths would round otherwise
        others = ({"u8gemm": self._u8_gemm} if sums is not None
                  else {"i8gemm": self._panel_gemm, "torch": self._dequantized_forward})
        if gemm and _fbgemm_competes():
            others["fbgemm"] = self._gemm
        y = kernels.project(x, w, b, s, others=others, inexact=("fbgemm",), act=act, residual=residual,
                            sums=sums)
        if y is not None:
            return y
        if gemm and kernels.rows(x) > kernels.DEFAULT_ROWS:
            return self._gemm(x, act, residual)
        return self._dequantized_forward(x, act, residual)

    def _dequantized_forward(self, x: Tensor, act: str | None = None, residual: Tensor | None = None) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return epilogue(F.linear(x, self.dequantized(x.dtype), bias), act, residual)

    def _weights_key(self) -> tuple:
        """The weight, scale and bias's identity: a packed copy made from them is remade when it changes."""
        return kernels.identity(self.weight, self.weight_scale, self.bias)

    def _panel_gemm(self, x: Tensor, act: str | None = None, residual: Tensor | None = None) -> Tensor:
        """Long inputs on Quill's int8 GEMM: activations rounded to int16 with one scale a row (as the decode
        kernels do), so a prefill keeps the decode path's accuracy (docs/performance.md). The weight is repacked
        into the kernel's column panels on first use (one more int8 copy) and again when it changes."""
        key = (self._weights_key(), kernels.i8_panels())  # the loaded variant's layout
        panels = self._panels.get(key, lambda: kernels.pack_i8(self.weight))
        _, s, b, _ = self.kernel_args()
        return kernels.gemm_i8(x, panels, s, b, self.out_features, act, residual)

    def _u8_gemm(self, x: Tensor, act: str | None = None, residual: Tensor | None = None) -> Tensor:
        """Long inputs on Quill's u8 x int8 GEMM (AVX-512 VNNI): activations rounded to 8 bits with a scale and a
        zero point a row, as the int8 peers round them, at twice the int16 GEMM's rate (docs/performance.md,
        "Quality"). The weight's packed copy is made on first use and remade when it changes."""
        _, s, b, sums = self.kernel_args()
        packed = self._u8_panels.get(self._weights_key(), lambda: kernels.pack_u8i8(self.weight, sums))
        return kernels.gemm_u8i8(x, packed, s, b, self.out_features, act, residual)

    def _gemm(self, x: Tensor, act: str | None = None, residual: Tensor | None = None) -> Tensor:
        """Long inputs (prefill) on fbgemm's int8 GEMM, activations quantised per tensor to uint8 on the fly.

        That is what ONNX Runtime's and transformers' dynamic int8 do; on AVX2 its byte multiply-adds
        (vpmaddubsw) do more work per instruction than fp32 FMAs (docs/performance.md has the figures). The
        packed weight (fbgemm's layout, one more int8 copy) is made on first use and remade when the weight,
        scale or bias change.
        """
        packed = self._packed.get(self._weights_key(), lambda: _prepack(self.weight, self.weight_scale, self.bias))
        x2 = x.reshape(-1, self.in_features).float().contiguous()
        y = torch.ops.quantized.linear_dynamic(x2, packed, True)  # reduce_range: no vpmaddubsw overflow
        return epilogue(y.to(x.dtype).view(*x.shape[:-1], self.out_features), act, residual)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def input_embedding(weight: Tensor, dtype: torch.dtype) -> nn.Embedding:
    """The token embedding of an int8 model of activation dtype `dtype`: float rows, bf16 under fp32."""
    rows = weight.detach().to(torch.bfloat16 if dtype == torch.float32 else dtype)
    return nn.Embedding(*rows.shape, _weight=rows, _freeze=True, device=rows.device)


def _linear_names(model: GPT) -> list[str]:
    from quill.model import Linear

    return [name for name, m in model.named_modules() if type(m) in (nn.Linear, Linear)]


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def keep_head_exact(model: GPT) -> None:
    """Keep the head's products on int16 activations: rounding its inputs to 8 bits moves the logits themselves
    (the fused decode step keeps the head on int16 rows too)."""
    if isinstance(model.lm_head, Int8Linear):
        model.lm_head.u8_inputs = False


def quantize_model(model: GPT, mode: str = "int8") -> GPT:
    """Swap every nn.Linear of `model` for an Int8Linear, in place (a tied embedding stays float, apart from
    the head: `input_embedding`); returns the model."""
    if mode not in MODES:
        raise InvalidParameter(f"unknown quantize mode {mode!r} (supported: {', '.join(MODES)})", "quantize")
    if is_quantized_model(model):
        return model
    dtype = model.dtype
    tied = model.config.tie_word_embeddings
    with torch.no_grad():
        for name in _linear_names(model):
            _set_module(model, name, Int8Linear.from_linear(model.get_submodule(name)))
        if tied:
            model.transformer.wte = input_embedding(model.transformer.wte.weight, dtype)
    keep_head_exact(model)
    model.forget_decode_plan()
    return model.eval()


def is_quantized_model(model: nn.Module) -> bool:
    return any(isinstance(m, Int8Linear) for m in model.modules())


# ---- checkpoints ------------------------------------------------------------------------------------------

def quantization_config(folder: str | os.PathLike) -> dict | None:
    """The `quantization_config` entry of a checkpoint's config.json when it is a Quill int8 checkpoint."""
    try:
        raw = json.loads((Path(folder) / CONFIG_FILE).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    qc = raw.get("quantization_config") if isinstance(raw, dict) else None
    if qc is None:
        return None
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
        method = qc.get("quant_method") if isinstance(qc, dict) else qc
        raise CheckpointError(f"unsupported quantization_config (quant_method {method!r}); Quill reads "
                              f"{QUANT_METHOD!r} checkpoints", CONFIG_FILE)
    return qc


def save_quantized(model: GPT, folder: str | os.PathLike, source: str | os.PathLike | None = None) -> None:
    """Write an int8 model as config.json + model.safetensors (+ the tokenizer files of `source`)."""
    if not is_quantized_model(model):
        raise ValueError("save_quantized needs a model quantised with quantize_model")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, Tensor] = {}
    for key, t in model.state_dict().items():
        tensors[key] = t.detach().cpu().contiguous()
    config = model.config.to_hf()
    config["torch_dtype"] = str(model.dtype).removeprefix("torch.")
    config["quantization_config"] = {
        "quant_method": QUANT_METHOD, "bits": 8, "symmetric": True, "granularity": "per_output_channel",
        "weight_layout": "out_in", "scale_suffix": "weight_scale",
        "modules": "all Linear layers (the token embedding stays float)",
    }
    atomic_write(folder / SAFETENSORS_FILE,
                 lambda p: save_file(tensors, p, metadata={"format": "pt", "quantization": QUANT_METHOD}))
    atomic_write(folder / CONFIG_FILE, lambda p: p.write_text(json.dumps(config, indent=2) + "\n"))
    if source is not None and Path(source).resolve() != folder.resolve():
        for name in TOKENIZER_FILES:
            if (Path(source) / name).is_file():
                shutil.copyfile(Path(source) / name, folder / name)


def load_quantized(folder: str | os.PathLike, dtype: torch.dtype = torch.float32,
                   device: torch.device | str = "cpu") -> GPT:
    """Build an int8 GPT from a folder written by `save_quantized` (float tensors in `dtype`)."""
    folder = Path(folder)
    quantization_config(folder)
    config = load_config(folder)
    tensors = dict(read_tensors(folder))
    with torch.device("meta"):
        model = GPT(config)

    def take(key: str, want_dtype: torch.dtype | None = None, shape: tuple | None = None) -> Tensor:
        if key not in tensors:
            raise CheckpointError(f"tensor {key!r} is missing from the checkpoint", SAFETENSORS_FILE)
        t = tensors.pop(key)
        if want_dtype is not None and t.dtype != want_dtype:
            raise CheckpointError(f"tensor {key!r} has dtype {t.dtype}, expected {want_dtype}", SAFETENSORS_FILE)
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise CheckpointError(f"tensor {key!r} has shape {tuple(t.shape)}, expected {tuple(shape)}",
                                  SAFETENSORS_FILE)
        return t.to(device)

    tied = config.tie_word_embeddings
    for name in _linear_names(model):
        if tied and name == "lm_head":
            continue  # below, with the embedding it was tied to
        meta = model.get_submodule(name)
        out_f, in_f = meta.weight.shape
        q = take(f"{name}.weight", torch.int8, (out_f, in_f))
        s = take(f"{name}.weight_scale", torch.float32, (out_f,))
        b = take(f"{name}.bias", None, (out_f,)).to(dtype) if meta.bias is not None else None
        _set_module(model, name, Int8Linear(q, s, b))
    if tied:
        v, c = config.vocab_size, config.n_embd
        shared = "lm_head.weight" not in tensors  # the earlier layout: one int8 matrix, the head's, for both
        head = "transformer.wte" if shared else "lm_head"
        model.lm_head = Int8Linear(take(f"{head}.weight", torch.int8, (v, c)),
                                   take(f"{head}.weight_scale", torch.float32, (v,)), None)
        rows = model.lm_head.dequantized(torch.float32) if shared else take("transformer.wte.weight", None, (v, c))
        if not rows.is_floating_point():
            raise CheckpointError(f"tensor 'transformer.wte.weight' has dtype {rows.dtype}, expected a "
                                  "floating-point type", SAFETENSORS_FILE)
        model.transformer.wte = input_embedding(rows, dtype)
    rest = {}
    for key, p in model.state_dict().items():  # the float parameters still on the meta device
        if p.device.type == "meta":
            t = take(key, None, tuple(p.shape))
            if not t.is_floating_point():
                raise CheckpointError(f"tensor {key!r} has dtype {t.dtype}, expected a floating-point type")
            rest[key] = t.to(dtype)
    if tensors:
        raise CheckpointError(f"unexpected tensor {sorted(tensors)[0]!r} in checkpoint", SAFETENSORS_FILE)
    model.load_state_dict(rest, strict=False, assign=True)
    keep_head_exact(model)
    return model.eval()


__all__ = ["Int8Linear", "input_embedding", "quantize_model", "quantize_weight", "save_quantized", "load_quantized",
           "quantization_config", "is_quantized_model", "QUANT_METHOD"]
