"""The hardware instruction counter: `quill cost --instructions` counts with it where the machine exposes one."""

from __future__ import annotations

import errno
import json

import pytest

import quill
from conftest import make_tiny_model
from quill import callgrind, perfcount
from quill.cli import main
from quill.costtable import ModelSpec, cells, choose_counter, count_cells

REASON = perfcount.unavailable_reason()
needs_counter = pytest.mark.skipif(REASON is not None, reason=str(REASON))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("perfcount"), n_embd=64, n_positions=32)


@pytest.mark.skipif(callgrind.unavailable_reason() is not None, reason=str(callgrind.unavailable_reason()))
def test_auto_takes_the_counter_where_it_opens():
    assert choose_counter("auto") == ("perf" if REASON is None else "callgrind")
    assert choose_counter("callgrind") == "callgrind"


@pytest.mark.skipif(REASON is None, reason="this machine has a hardware instruction counter")
def test_asking_for_a_missing_counter_is_a_one_line_error(folder, capsys):
    assert main(["cost", str(folder), "--inputs", "1", "--outputs", "1", "--instructions", "--counter",
                 "perf"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and "perf_event_open" in err


def test_a_failed_open_names_the_syscall_and_errno(monkeypatch):
    """Where the counter is missing (ENOENT on this project's VM), the reason names perf_event_open and errno."""
    monkeypatch.setattr(perfcount, "_fd", None)
    monkeypatch.setattr(perfcount._library(), "quill_pc_open", lambda: -errno.ENOENT)
    reason = perfcount.unavailable_reason()
    assert reason.startswith("perf_event_open(") and "ENOENT" in reason
    with pytest.raises(perfcount.CounterUnavailable, match="perf_event_open"):
        perfcount.count(["-c", "pass"])


@needs_counter
def test_perf_counts_repeat_and_grow(folder, capsys):
    """Two counted runs (the CLI's and a direct one) agree within 1% per call, and more tokens cost more."""
    inputs, outputs = [1, 4, 16], [1, 2]
    table = cells(quill.load(folder).config, inputs, outputs)
    count_cells(ModelSpec(str(folder)), table, counter="perf")
    assert main(["cost", str(folder), "--inputs", "1,4,16", "--outputs", "1,2", "--instructions", "--counter",
                 "perf", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    for row, cell in zip(rows, table):
        assert row["counter"] == cell.counter == "perf"
        assert abs(row["instructions"] - cell.instructions) <= 0.01 * row["instructions"]
    for n in outputs:
        counts = [r["instructions"] for r in rows if r["output_tokens"] == n]
        assert counts == sorted(counts) and len(set(counts)) == len(counts), (n, counts)
