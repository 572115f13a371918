"""`bench/decode.py` end to end on a tiny model (Quill, transformers and ONNX Runtime in their worker processes):
the report's figures follow from its own samples by the stated formulas, and its goals and ratios from its
figures. Speed itself is never asserted."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys

from conftest import ROOT, make_tiny_model

from safetensors import safe_open

from bench.runners import BYTES_PER_WEIGHT
from quill.kernels.cpu import VARIANTS

SYSTEMS = {"quill fp32", "quill bf16", "quill int8", "transformers fp32", "transformers bf16",
           "transformers dynamic int8", "onnxruntime fp32", "onnxruntime int8"}


def test_decode_benchmark_report(tmp_path):
    model = make_tiny_model(tmp_path / "tiny", tokenizer="gpt2", n_positions=640)  # room for the 512-token prefill
    out = tmp_path / "out"
    run = subprocess.run(
        [sys.executable, "bench/decode.py", "--model", str(model), "--quick", "--runs", "1", "--new-tokens", "8",
         "--decode-passes", "2",
         "--systems", "quill,transformers,ort", "--out", str(out), "--work", str(tmp_path / "work")],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    (report,) = out.glob("*.json")  # one set per kernel variant: named by the variant the run used
    rep = json.loads(report.read_text())
    variant = rep["machine"]["kernels"] if rep["machine"]["kernels"] in VARIANTS else "torch"
    assert report.name == f"decode-tiny-{variant}-quick.json"
    assert (out / f"decode-tiny-{variant}-quick.png").stat().st_size > 0
    md = (out / f"decode-tiny-{variant}-quick.md").read_text()
    res = {r["system"]: r for r in rep["results"]}
    assert set(res) == SYSTEMS

    with safe_open(model / "model.safetensors", "pt") as f:  # a token reads every matrix, wte as the tied head
        matrices = sum(f.get_slice(k).get_shape()[0] * f.get_slice(k).get_shape()[1] for k in f.keys()
                       if k.endswith(".weight") and len(f.get_slice(k).get_shape()) == 2 and ".wpe." not in k)
    for r in res.values():
        per_token = matrices * BYTES_PER_WEIGHT[r["precision"]]
        (bw,) = [b * 1e9 for b in r["bandwidth_samples_GBps"]]  # one round: one bandwidth sample, two decodes
        first, _ = r["decode_samples"]
        assert r["decode_tok_s"] == statistics.median(r["decode_samples"]) > 0
        assert abs(r["bound_tok_s"] - bw / per_token) <= 1e-9 * r["bound_tok_s"]
        assert abs(r["pct_of_bound"] - 100 * first / r["bound_tok_s"]) <= 1e-6 * r["pct_of_bound"]  # the probed one
        assert r["prefill_tok_s"] == statistics.median(r["prefill_samples"]) > 0
        assert r["batched_tok_s"]["8"] == statistics.median(r["batched_samples"]["8"]) > 0
        assert r["system"] in md and f"{r['decode_tok_s']:.1f}" in md

    q32, q8, ort8 = res["quill fp32"], res["quill int8"], res["onnxruntime int8"]
    for r in res.values():  # one round: its medians are the run's
        assert r["round_medians"]["decode"] == [r["decode_tok_s"]]
        assert r["round_medians"]["prefill-512"] == [r["prefill_tok_s"]]
    goals = rep["goals"]
    assert goals["int8 decode >= 1.5x ORT int8"] == (q8["decode_tok_s"] >= 1.5 * ort8["decode_tok_s"])
    assert goals["fp32 prefill-512 >= best peer"] == (
        q32["prefill_tok_s"] >= max(res[p]["prefill_tok_s"] for p in ("transformers fp32", "onnxruntime fp32")))
    assert goals["fp32 batch-8 >= 5x batch-1"] == (q32["batched_tok_s"]["8"] >= 5 * q32["decode_tok_s"])
    best = max(("transformers fp32", "onnxruntime fp32"), key=lambda p: res[p]["prefill_tok_s"])
    assert f"| quill fp32 | prefill-512 | {best} | {q32['prefill_tok_s'] / res[best]['prefill_tok_s']:.2f}x |" in md
    assert "bf16 decode >= llama.cpp f16" not in goals  # no llama.cpp in this run: no verdict either way
    assert "fp32 decode >= llama.cpp f32" not in goals
    assert f"{q32['decode_tok_s'] / res['onnxruntime fp32']['decode_tok_s']:.2f}x" in md
    quality = rep["top1_agreement_with_fp32"]
    assert set(quality) == {"quill fp32", "quill bf16", "quill int8"} and rep["quality_positions"] == 512
    assert quality["quill fp32"] == {"prefill": 1.0, "decode": 1.0}  # the reference against itself, both ways
    assert all(0 <= v <= 1 for modes in quality.values() for v in modes.values())
    assert f"| quill int8 | {100 * quality['quill int8']['prefill']:.1f}% | " in md


def _result(system, family, precision, rounds):
    """A report row as run_benchmark writes it, from each column's round medians (None: not measured)."""
    def median(col):
        got = [v for v in rounds.get(col, []) if v]
        return statistics.median(got) if got else None
    return {"system": system, "family": family, "precision": precision, "pct_of_bound": 95.0,
            "decode_tok_s": median("decode"), "prefill_tok_s": median("prefill-512"),
            "batched_tok_s": {b: median(f"batch-{b}") for b in (4, 8, 16) if median(f"batch-{b}")},
            "round_medians": rounds}


def test_goals_compare_round_by_round(monkeypatch):
    """A machine whose speed drifts between rounds: Quill ahead of the peer in every round but behind by the
    ratio of whole-run medians, and a peer ahead in every round though level by medians; the goals follow the
    rounds, and the best peer is the one with the highest median."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import decode

    quill = _result("quill int8", "quill", "int8", {"decode": [100, 110, 300], "prefill-512": [500, 800, 1000],
                                                    "batch-8": [800, 900, 1200], "batch-16": [790, 890, 1190]})
    ort = _result("onnxruntime int8", "onnxruntime", "int8", {"decode": [90, 250, 280], "prefill-512": [520, 790, 1100]})
    ct2 = _result("ctranslate2 int8", "ctranslate2", "int8", {"decode": [80, 70, 60], "prefill-512": [400, 820, 900]})
    results = [quill, ort, ct2]
    assert decode.best_peers(results, "int8") == {"decode": ort, "prefill-512": ct2}
    assert decode.round_ratios(quill, "decode", ort) == [100 / 90, 110 / 250, 300 / 280]
    assert quill["decode_tok_s"] / ort["decode_tok_s"] < 1 < decode.paired_ratio(quill, "decode", ort)
    assert decode.paired_ratio(quill, "prefill-512", ct2) == statistics.median([500 / 400, 800 / 820, 1000 / 900])
    goals = decode.check_goals(results, (1, 8, 16))
    assert goals["int8 decode >= best peer"] is True
    assert goals["int8 decode >= 1.3x best peer's int8"] is False  # 300 / 280, 110 / 250: the median 1.07x
    assert goals["int8 prefill-512 >= best peer"] is True  # against CTranslate2 (median 820 > ORT's 790): 800 < 820
    assert goals["int8 batch-8 >= 5x batch-1"] is True  # 8x, 8.2x, 4x: the median 8x
    assert goals["int8 batch-16 >= batch-8"] is False  # lower in every round by 1%
    assert "int8 batch-8 >= best peer" not in goals  # no peer batched


def test_missing_peer_packages_are_left_out_with_a_note(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import peers

    monkeypatch.setattr(peers.importlib.util, "find_spec", lambda name: None)
    notes: list[str] = []
    assert peers.prepare({"ct2", "openvino"}, tmp_path, tmp_path, {}, print, notes) == {}
    assert len(notes) == 2 and "ctranslate2" in notes[0] and "openvino" in notes[1]


def test_prefix_benchmark_runs_and_reports_the_hits(tmp_path):
    """`bench/prefix.py` on a tiny model: the hit finds the shared prefix's whole blocks, the chat's turns find
    the earlier ones, and each ratio follows from its two times."""
    model = make_tiny_model(tmp_path / "tiny", tokenizer="gpt2", n_positions=1024)
    run = subprocess.run([sys.executable, "bench/prefix.py", "--model", str(model), "--quick"], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rep = json.loads(run.stdout[:run.stdout.rindex("}") + 1])
    shared, chat = rep["shared_prefix"], rep["chat"]
    assert shared["cached_tokens"] == 896
    assert shared["speedup"] == shared["ttft_miss_s"] / shared["ttft_hit_s"]
    assert chat["cached_tokens"] >= 9 * chat["system_tokens"]  # every turn after the first finds the system prompt
    assert chat["speedup"] == chat["prefill_without_s"] / chat["prefill_with_cache_s"]
