"""CTranslate2 and OpenVINO in the decode benchmark: their runners and the conversions they need.

- CTranslate2 (`ctranslate2`): the checkpoint converted once by its transformers converter (float32), loaded
  with each compute type this CPU supports among int8, int8_float32, bfloat16 and float32 (CTranslate2
  quantises on load). Token strings from the converted vocabulary: its generator takes tokens, not ids.
- OpenVINO (`openvino`): the ONNX graph Quill exports for ONNX Runtime (KV cache inputs, last logits only),
  read directly; fp32 with f32 inference precision forced, int8 weight compression by `nncf`
  (compress_weights' default, INT8_ASYM) at the CPU plugin's default precision, and bf16 where the CPU
  reports BF16. A second graph with every position's logits serves the top-1 agreement.

Both are imported only inside their runners and preparations; a missing package is reported and skipped.
"""

from __future__ import annotations

import importlib.util
import json
import os
import time
from pathlib import Path

from runners import OrtRunner, Runner

CT2_TYPES = {"int8": "int8", "int8_float32": "int8", "bfloat16": "bf16", "float32": "fp32"}


class Ct2Runner(Runner):
    family = "ctranslate2"
    agreement_modes = ("prefill",)

    def __init__(self, model_dir: str, compute_type: str):
        import ctranslate2

        self.ct2, self.dir, self.compute_type = ctranslate2, model_dir, compute_type
        self.vocab = json.loads((Path(model_dir) / "vocabulary.json").read_text())
        self.threads = os.cpu_count() or 1
        self.generators: dict[int, object] = {}
        self._generator()
        super().__init__(f"ctranslate2 {compute_type}", CT2_TYPES[compute_type])

    def set_threads(self, n):
        self.threads = n

    def _generator(self):
        if self.threads not in self.generators:
            self.generators[self.threads] = self.ct2.Generator(
                self.dir, device="cpu", compute_type=self.compute_type, intra_threads=self.threads, inter_threads=1)
        return self.generators[self.threads]

    def _generate(self, rows: list[list[int]], new: int):
        tokens = [[self.vocab[i] for i in r] for r in rows]
        return self._generator().generate_batch(tokens, max_length=new, min_length=new, sampling_topk=1,
                                                include_prompt_in_result=False)

    def decode(self, prompt, new, batch=1):
        if batch == 1:  # a stream times the first token
            steps = self._generator().generate_tokens([self.vocab[i] for i in prompt], max_length=new,
                                                      min_length=new, sampling_topk=1)
            next(steps)
            t0 = time.perf_counter()
            for _ in steps:
                pass
            return time.perf_counter() - t0
        t0 = time.perf_counter()  # rows: total time minus that of a one-token generation (the prefill)
        self._generate([prompt] * batch, 1)
        t1 = time.perf_counter()
        self._generate([prompt] * batch, new)
        t2 = time.perf_counter()
        return (t2 - t1) - (t1 - t0)

    def prefill(self, prompt):
        t0 = time.perf_counter()
        self._generate([prompt], 1)
        return time.perf_counter() - t0

    def top1(self, ids, mode="prefill"):
        import numpy as np

        logits = self._generator().forward_batch([list(ids)])
        if logits.dtype != self.ct2.DataType.float32:
            logits = logits.to(self.ct2.DataType.float32)
        return np.asarray(logits)[0].argmax(-1).tolist()


class OpenVinoRunner(OrtRunner):
    """OpenVINO on the exported ONNX graph; the decode loop is ONNX Runtime's (same inputs and outputs)."""

    family = "openvino"
    agreement_modes = ("prefill",)

    def __init__(self, xml: str, scoring_xml: str, precision: str, inference_precision: str | None, label: str):
        import numpy as np
        import openvino

        self.np, self.core = np, openvino.Core()
        self.model, self.scoring_model = self.core.read_model(xml), self.core.read_model(scoring_xml)
        self.inference_precision = inference_precision
        self.sessions: dict[int, object] = {}
        self.threads = os.cpu_count() or 1
        self.names = [p.get_any_name() for p in self.model.inputs]
        past = self.model.inputs[1].get_partial_shape()  # [batch, n_head, past, head_dim]
        self.n_head, self.head_dim = past[1].get_length(), past[3].get_length()
        self._session()
        Runner.__init__(self, f"openvino {label}", precision)

    def _compile(self, model, threads: int):
        config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
        if self.inference_precision:
            config["INFERENCE_PRECISION_HINT"] = self.inference_precision
        return self.core.compile_model(model, "CPU", config)

    def _session(self):
        if self.threads not in self.sessions:
            self.sessions[self.threads] = self._compile(self.model, self.threads)
        return self.sessions[self.threads]

    def _run(self, sess, ids, past):
        res = sess({"input_ids": ids, **dict(zip(self.names[1:], past))})
        out = [res[o] for o in sess.outputs]
        return out[0][:, -1].argmax(-1), out[1:]

    def top1(self, ids, mode="prefill"):
        sess = self._compile(self.scoring_model, self.threads)
        res = sess({"input_ids": self.np.array([ids], dtype=self.np.int64),
                    **dict(zip(self.names[1:], self._empty(1)))})
        return res[sess.outputs[0]][0].argmax(-1).tolist()


def openvino_precisions() -> list[tuple[str, str, str | None, str]]:
    """(precision, graph, inference precision hint, label) for each OpenVINO runner this CPU can run."""
    import openvino

    runs = [("fp32", "fp32", "f32", "fp32"), ("int8", "int8", None, "int8 (NNCF weights, CPU defaults)")]
    if "BF16" in openvino.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        runs.append(("bf16", "fp32", "bf16", "bf16"))
    return runs


def prepare(systems: set[str], folder: Path, work: Path, onnx: dict[str, Path], log, notes: list[str]) -> dict:
    """Worker configs for the peers named in `systems` ("ct2", "openvino"), converting what they need once
    into `work`; a peer whose package is missing, or a type the CPU lacks, is left out with a note."""
    configs: dict[str, dict] = {}
    if "ct2" in systems:
        if importlib.util.find_spec("ctranslate2") is None:
            notes.append("CTranslate2 skipped: the ctranslate2 package is not installed (pip install ctranslate2)")
        else:
            import ctranslate2
            from ctranslate2.converters import TransformersConverter

            out = work / "ct2"
            if not (out / "model.bin").exists():
                log("converting for CTranslate2 ...")
                TransformersConverter(str(folder)).convert(str(out), force=True)
                config = json.loads((out / "config.json").read_text())
                if config.get("unk_token") is None:  # CTranslate2 needs one; GPT-2's tokenizer uses its eos token
                    config["unk_token"] = config["eos_token"]
                    (out / "config.json").write_text(json.dumps(config, indent=2))
            supported = ctranslate2.get_supported_compute_types("cpu")
            types = [t for t in CT2_TYPES if t in supported]
            if len(types) < len(CT2_TYPES):
                notes.append(f"CTranslate2 {', '.join(t for t in CT2_TYPES if t not in supported)}: not supported "
                             f"on this CPU (CTranslate2 lists {', '.join(sorted(supported))})")
            configs["ctranslate2"] = {"dir": str(out), "compute_types": types}
    if "openvino" in systems:
        missing = [p for p in ("openvino", "nncf") if importlib.util.find_spec(p) is None]
        if missing:
            notes.append(f"OpenVINO skipped: {' and '.join(missing)} not installed (pip install openvino nncf)")
        else:
            import nncf
            import openvino

            graphs = {}
            for kind, src in onnx.items():  # "decode" (last logits only) and "scoring" (every position)
                for precision in ("fp32", "int8"):
                    xml = work / f"openvino-{precision}-{kind}" / "model.xml"
                    if not xml.exists():
                        log(f"converting for OpenVINO {precision} ({kind}) ...")
                        model = openvino.Core().read_model(str(src))
                        if precision == "int8":
                            model = nncf.compress_weights(model)
                        openvino.save_model(model, str(xml))
                    graphs[precision, kind] = str(xml)
            runs = openvino_precisions()
            if not any(p == "bf16" for p, *_ in runs):
                notes.append("OpenVINO bf16: the CPU does not report BF16 (left out)")
            configs["openvino"] = {"runs": [{"xml": graphs[g, "decode"], "scoring_xml": graphs[g, "scoring"],
                                             "precision": p, "inference_precision": hint, "label": label}
                                            for p, g, hint, label in runs]}
    return configs


def runners(family: str, cfg: dict) -> list[Runner] | None:
    """The runners of a peer family in its worker, or None for a family this module does not know."""
    if family == "ctranslate2":
        return [Ct2Runner(cfg["dir"], t) for t in cfg["compute_types"]]
    if family == "openvino":
        return [OpenVinoRunner(**run) for run in cfg["runs"]]
    return None
