#!/usr/bin/env python3
"""A benchmark worker process: `python bench/worker.py FAMILY CONFIG_JSON`, started by bench/decode.py.

Each family (quill, transformers, onnxruntime, llama.cpp, ctranslate2, openvino) runs in a process of its own because their thread
pools (torch's OpenMP, ORT's, ggml's) must not share one. This script builds the family's runners
(bench/runners.py) and answers the driver's JSON-line requests; it imports torch or quill only when the
family's runners do, so the llama.cpp worker never loads them.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's quill, as the driver uses

import peers  # noqa: E402
from runners import LlamaRunner, OrtRunner, QuillRunner, Runner, TransformersRunner  # noqa: E402


def _local_runners(family: str, cfg: dict) -> list[Runner]:
    if family == "quill":
        return [QuillRunner(cfg["folder"], p) for p in ("fp32", "bf16", "int8")] + (
            [QuillRunner(cfg["folder"], "fp32", compile=True)] if cfg.get("compile") else [])
    if family == "transformers":
        return [TransformersRunner(cfg["folder"], p) for p in ("fp32", "bf16", "int8")]
    if family == "onnxruntime":
        return [OrtRunner(cfg["fp32"], "fp32"), OrtRunner(cfg["int8"], "int8")]
    if family == "llama.cpp":
        return [LlamaRunner(cfg[t], t, cfg["n_ctx"]) for t in ("f32", "f16", "q8_0")]
    found = peers.runners(family, cfg)
    if found is None:
        raise ValueError(family)
    return found


def worker_main(family: str, cfg_json: str) -> None:
    """A worker process: build the family's runners, then answer JSON-line requests on the original stdout."""
    if family == "quill":
        os.environ["QUILL_PROFILE"] = "1"  # per-part timing of decode steps (a few clock reads per layer)
        # the path tuner's timings and choices go to the worker's log: a run's speed can be traced to them
        logging.basicConfig(stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
        logging.getLogger("quill.kernels.tune").setLevel(logging.INFO)
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything the libraries print goes to stderr, never into the protocol
    runners = {r.name: r for r in _local_runners(family, json.loads(cfg_json))}
    proto.write(json.dumps({"runners": [r.describe() for r in runners.values()]}) + "\n")
    for line in sys.stdin:
        msg = json.loads(line)
        if msg["op"] == "quit":
            break
        try:
            r = runners[msg["name"]]
            if "threads" in msg:
                r.set_threads(msg["threads"])
            proto.write(json.dumps({"ok": getattr(r, msg["op"])(**msg.get("args", {}))}) + "\n")
        except Exception as e:  # reported to the driver, which stops with it
            proto.write(json.dumps({"error": f"{type(e).__name__}: {e}"}) + "\n")



if __name__ == "__main__":
    worker_main(sys.argv[1], sys.argv[2])
