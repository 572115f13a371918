"""`quill cost`: FLOP cells against the formula and torch's counter, instructions from a real callgrind run."""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor

import pytest
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import quill
from conftest import make_tiny_model
from quill import callgrind
from quill.cli import main
from quill.cost import generation_flops
from quill.costtable import ModelSpec, cells, count_cells, no_cache_call, prompt, real_call, settle_paths

INPUTS, OUTPUTS = [1, 4, 16], [1, 2]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """2 layers, d=64, context 32: callgrind slows the counted calls ~50-fold, so they must be tiny."""
    return make_tiny_model(tmp_path_factory.mktemp("cost"), n_embd=64, n_positions=32)


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(["cost", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def masked(config, n: int) -> int:
    """FLOPs a dense causal kernel spends on the masked half of a fresh n-token forward (tests/test_cost.py)."""
    return config.n_layer * 4 * config.n_embd * (n * n - n * (n + 1) // 2)


def test_flop_cells_equal_formula_and_flop_counter(folder, capsys):
    code, out, _ = run_cli(capsys, folder, "--inputs", ",".join(map(str, INPUTS)), "--outputs", "1,2,5", "--json")
    rows = json.loads(out)
    assert code == 0 and [(r["input_tokens"], r["output_tokens"]) for r in rows] == [
        (p, n) for p in INPUTS for n in (1, 2, 5)]
    engine = quill.load(folder)
    cfg = engine.config
    for row in rows:
        p, n = row["input_tokens"], row["output_tokens"]
        assert row["flops"] == generation_flops(cfg, p, n) and row["flops_no_cache"] == generation_flops(cfg, p, n,
                                                                                                      kv_cache=False)
        assert row["seconds"] > 0 and "instructions" not in row
        # torch's counter over the very calls the cells stand for (the torch path: fast kernels stand aside
        # under a dispatch mode); each fresh forward of k > 1 tokens also multiplies its masked half.
        cell = cells(cfg, [p], [n])[0]
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
            real_call(engine, cell)
        assert fc.get_total_flops() == row["flops"] + masked(cfg, p)
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
            no_cache_call(engine, cell)
        assert fc.get_total_flops() == row["flops_no_cache"] + sum(masked(cfg, p + t) for t in range(n))


@pytest.mark.parametrize("argv, message", [
    (["--inputs", ""], "comma-separated"),
    (["--inputs", "1,,2"], "comma-separated"),
    (["--outputs", "1,x"], "whole numbers"),
    (["--outputs", "2.5"], "whole numbers"),
    (["--inputs", "0,1"], "at least 1"),
    (["--inputs", "1,30", "--outputs", "4"], "context of 32"),
])
def test_bad_arguments_are_one_line_errors(folder, capsys, argv, message):
    code, out, err = run_cli(capsys, folder, *argv)
    assert code == 2 and out == "" and message in err and err.count("\n") == 1 and err.startswith("quill: error:")


def test_unavailable_without_valgrind(monkeypatch):
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name: None if name == "valgrind" else real_which(name))
    assert "valgrind" in callgrind.unavailable_reason()
    with pytest.raises(callgrind.CallgrindUnavailable, match="valgrind"):
        callgrind.count(["-c", "pass"])


def test_paths_are_settled_natively_for_the_counted_worker(folder, tmp_path, monkeypatch):
    """With the path tuner on, the calls to count first run natively in the worker's environment (one thread, its
    kernel variant), so its cache holds their row classes before the worker starts: callgrind's worker reads the
    choices a native run makes rather than timing paths under valgrind."""
    from quill.kernels.tune import row_class

    monkeypatch.setenv("QUILL_TUNE", "1")
    monkeypatch.setenv("QUILL_CACHE_DIR", str(tmp_path))
    job = {"model": {"path": str(folder)}, "warm_each": False, "counter": "callgrind",
           "runs": [["instructions", 9, 2], ["instructions_no_cache", 3, 2]]}
    settle_paths(job, callgrind.worker_environment())
    files = list((tmp_path / "tuning").glob("paths-*.json"))
    assert len(files) == 1
    saved = json.loads(files[0].read_text())
    assert saved["machine"]["threads"] == 1 and saved["machine"]["isa"] == callgrind.worker_environment().get(
        "QUILL_ISA", saved["machine"]["isa"])
    classes = {key.split("rows<=")[1].split()[0] for key in saved["choices"] if "rows<=" in key}
    assert saved["trials"] == {}  # the second native run confirmed every choice: the counted worker times none
    assert classes == {str(row_class(9)), str(row_class(3)), str(row_class(4))}  # 9; the no-cache 3 and 3 + 1


@pytest.mark.skipif(callgrind.unavailable_reason() is not None, reason=str(callgrind.unavailable_reason()))
def test_counted_instructions_repeat_and_grow(folder, capsys):
    """Two callgrind runs (the CLI's and a direct one, side by side) count each call within 1% of each other,
    and a longer prompt always costs more instructions, with and without a cache."""
    def direct():
        table = cells(quill.load(folder).config, INPUTS, OUTPUTS)
        count_cells(ModelSpec(str(folder)), table, ("instructions", "instructions_no_cache"), counter="callgrind")
        return table

    with ThreadPoolExecutor(1) as pool:
        second = pool.submit(direct)
        code, out, _ = run_cli(capsys, folder, "--inputs", "1,4,16", "--outputs", "1,2", "--no-cache", "--counter",
                                 "callgrind", "--json")
        second = second.result()
    first = json.loads(out)
    assert code == 0
    for row, cell in zip(first, second):
        assert (row["input_tokens"], row["output_tokens"]) == (cell.input_tokens, cell.output_tokens)
        assert row["counter"] == cell.counter == "callgrind"
        for field in ("instructions", "instructions_no_cache"):
            assert row[field] > 0 and abs(row[field] - getattr(cell, field)) <= 0.01 * row[field]
    for field in ("instructions", "instructions_no_cache"):
        for n in OUTPUTS:
            counts = [r[field] for r in first if r["output_tokens"] == n]
            assert counts == sorted(counts) and len(set(counts)) == len(counts), (field, n, counts)
        for p in INPUTS:  # and a longer generation too
            counts = [r[field] for r in first if r["input_tokens"] == p]
            assert counts[0] < counts[1], (field, p, counts)


def test_cells_share_no_prefix_cache(folder):
    """Each cell stands for a call of a new prompt: the cells' prompts start alike, and a default engine's
    prefix cache would hand a later, longer one the earlier one's KV rows."""
    for engine, reused in ((quill.load(folder), True), (ModelSpec(str(folder)).load(), False)):
        config = engine.config
        engine.generate(prompt(config, 20), 1, temperature=0, ignore_eos=True)
        cached = engine.generate(prompt(config, 24), 1, temperature=0, ignore_eos=True).usage.cached_tokens
        assert (cached > 0) == reused, (reused, cached)
