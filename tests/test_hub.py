"""Models by Hugging Face repo id, through the real `huggingface_hub` client against a loopback stand-in Hub.

Each test runs Quill in subprocesses with HF_ENDPOINT at the stand-in (tests/hubstub.py) and HF_HOME in a
temporary folder, as a user would (huggingface_hub reads its variables when it is imported). The stand-in serves
a random-initialised GPT-2 with the real GPT-2 tokenizer, and repos that must fail in their own ways.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, free_port, make_tiny_model
from hubstub import HubStub

REPO = "quill-test/tiny-gpt2"
PROMPT = "Hello there"
GENERATE = ("import json, sys, quill\n"
            "e = quill.load(sys.argv[1])\n"
            "print(json.dumps({'name': e.name, 'path': str(e.path), "
            "'tokens': e.generate(sys.argv[2], 12, temperature=0).tokens}))\n")
ERRORS = ("import sys, quill\n"
          "for name in sys.argv[1:]:\n"
          "    try:\n"
          "        quill.load(name)\n"
          "        print(name, 'loaded')\n"
          "    except quill.errors.QuillError as e:\n"
          "        print(name, type(e).__name__, e)\n")


@pytest.fixture(scope="module")
def repos(tmp_path_factory) -> dict[str, Path]:
    """The stand-in Hub's repos: a GPT-2 (13 MB of weights: more than huggingface_hub reads at once, so a cut
    download keeps a part to resume from), a llama config with weights, and a GPT-2 config without weights."""
    work = tmp_path_factory.mktemp("hub-repos")
    tiny = make_tiny_model(work / "tiny-gpt2", tokenizer="gpt2", n_positions=64, n_embd=64)
    llama = shutil.copytree(tiny, work / "llama")
    config = json.loads((tiny / "config.json").read_text())
    (llama / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    no_weights = shutil.copytree(tiny, work / "no-weights", ignore=shutil.ignore_patterns("*.safetensors"))
    pickled = shutil.copytree(no_weights, work / "pickled")  # the same tensors as an old pytorch_model.bin
    import torch
    from safetensors.torch import load_file

    torch.save(load_file(tiny / "model.safetensors"), pickled / "pytorch_model.bin")
    return {REPO: tiny, "quill-test/llama": llama, "quill-test/no-weights": no_weights, "quill-test/gated": tiny,
            "quill-test/pickled": pickled}


def hub_env(url: str, home: Path, offline: bool = False) -> dict[str, str]:
    # a download held by the stub (hold_once) must wait for the test, not time out into a retry that finishes it
    env = {**os.environ, "HF_ENDPOINT": url, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1" if offline else "0",
           "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DOWNLOAD_TIMEOUT": "300", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT)}
    env.pop("HF_TOKEN", None)
    env.pop("HF_HUB_CACHE", None)
    return env


def python(code: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)


def quill(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "quill.cli", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=300)


def folder_tokens(folder: Path) -> list[int]:
    import quill as q

    return q.load(folder).generate(PROMPT, 12, temperature=0).tokens


def test_load_by_repo_id_downloads_then_loads_from_the_cache_offline(repos, tmp_path):
    stub = HubStub(repos)
    try:
        first = python(GENERATE, REPO, PROMPT, env=hub_env(stub.url, tmp_path))
        assert first.returncode == 0, first.stderr
        got = json.loads(first.stdout)
        assert got["name"] == REPO and "models--quill-test--tiny-gpt2" in got["path"]
        assert got["tokens"] == folder_tokens(repos[REPO])
        fetched = {p.rsplit("/", 1)[-1] for m, p, _ in stub.requests if m == "GET" and "/resolve/" in p}
        assert "model.safetensors" in fetched and "config.json" in fetched
        pickled = python(GENERATE, "quill-test/pickled", PROMPT, env=hub_env(stub.url, tmp_path))
        assert pickled.returncode == 0 and json.loads(pickled.stdout)["tokens"] == got["tokens"], pickled.stderr
        asked = len(stub.requests)
        cached = python(GENERATE, REPO, PROMPT, env=hub_env(stub.url, tmp_path))  # online, but in the cache
        assert cached.returncode == 0 and json.loads(cached.stdout)["tokens"] == got["tokens"], cached.stderr
        assert stub.requests[asked:] == []  # a cached model loads with no network call
    finally:
        stub.stop()
    # the Hub is gone: offline mode, and plain mode against a dead endpoint, both load from the cache
    for env in (hub_env(stub.url, tmp_path, offline=True), hub_env(f"http://127.0.0.1:{free_port()}", tmp_path)):
        again = python(GENERATE, REPO, PROMPT, env=env)
        assert again.returncode == 0, again.stderr
        assert json.loads(again.stdout)["tokens"] == got["tokens"]


def test_pull_resumes_a_cut_download_then_models_lists_it_and_rm_removes_it(repos, tmp_path):
    stub = HubStub(repos, cut_once=("model.safetensors",))
    env = hub_env(stub.url, tmp_path)
    try:
        pulled = quill("pull", "quill-test/tiny-gpt2", env=env)
    finally:
        stub.stop()
    assert pulled.returncode == 0, pulled.stderr
    assert f"pulling quill-test/tiny-gpt2: {len(list(repos[REPO].iterdir()))} files" in pulled.stderr
    weights = [(m, r) for m, p, r in stub.requests if m == "GET" and p.endswith("/model.safetensors")]
    assert len(weights) == 2 and weights[0][1] is None and weights[1][1].startswith("bytes=")  # resumed, not restarted
    assert int(weights[1][1][6:].rstrip("-")) > 0
    snapshot = Path(pulled.stdout.split(": ", 1)[1].strip())
    assert (snapshot / "model.safetensors").read_bytes() == (repos[REPO] / "model.safetensors").read_bytes()

    listed = quill("models", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    from quill.weights import load_config

    entry = next(m for m in json.loads(listed.stdout) if m["name"] == REPO)
    assert entry["source"] == "cached" and Path(entry["path"]) == snapshot
    assert entry["parameters"] == load_config(repos[REPO]).num_params()
    assert entry["bytes"] >= (repos[REPO] / "model.safetensors").stat().st_size

    removed = quill("rm", REPO, env=env)
    assert removed.returncode == 0, removed.stderr
    assert not snapshot.exists()
    assert REPO not in {m["name"] for m in json.loads(quill("models", "--json", env=env).stdout)}
    again = quill("rm", REPO, env=env)
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and "not in the Hugging Face cache" in again.stderr


def test_a_pull_stopped_with_ctrl_c_continues_where_it_stopped(repos, tmp_path):
    """Ctrl-C mid-file keeps the bytes in a partial file of the cache, which the next run continues (Range)."""
    import signal

    stub = HubStub(repos, hold_once=("model.safetensors",))  # the weights' download waits at 90% to be stopped
    env = {**hub_env(stub.url, tmp_path), "HF_HUB_VERBOSITY": "warning"}  # a retried read shows in a failure
    blobs = tmp_path / "hub" / "models--quill-test--tiny-gpt2" / "blobs"
    try:
        # SIGINT as a terminal delivers it: a test run started in the background (`make test &`) ignores it,
        # and a child would inherit that
        first = subprocess.Popen([sys.executable, "-m", "quill.cli", "pull", REPO], cwd=ROOT, env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                 preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.monotonic() + 120
        while not [p for p in blobs.glob("*.part") if p.stat().st_size > 0]:
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.02)
        first.send_signal(signal.SIGINT)
        out, err = first.communicate(timeout=60)
        assert first.returncode == 130, (out, err)
        part = next(blobs.glob("*.part"))
        kept = part.stat().st_size
        weights = (repos[REPO] / "model.safetensors").read_bytes()
        assert 0 < kept < len(weights) and part.read_bytes() == weights[:kept]
        stub.release()
        asked = len(stub.requests)
        second = quill("pull", REPO, env=env)
    finally:
        stub.stop()
    assert second.returncode == 0, second.stderr
    ranges = [r for m, p, r in stub.requests[asked:] if m == "GET" and p.endswith("/model.safetensors")]
    assert ranges == [f"bytes={kept}-"]  # continued from the partial file, not from the start
    snapshot = Path(second.stdout.split(": ", 1)[1].strip())
    assert (snapshot / "model.safetensors").read_bytes() == weights
    assert not list(blobs.glob("*.part"))


def test_a_download_that_does_not_match_the_listing_is_refused_and_removed(repos, tmp_path):
    stub = HubStub(repos, corrupt=("model.safetensors",))
    try:
        out = quill("pull", REPO, env=hub_env(stub.url, tmp_path))
    finally:
        stub.stop()
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.rstrip("\n").rsplit("\n", 1)[-1].startswith("quill: error: model.safetensors of "
                                                                 f"{REPO} from {stub.url} does not match the checksum")
    blobs = tmp_path / "hub" / "models--quill-test--tiny-gpt2" / "blobs"
    sizes = {p.stat().st_size for p in blobs.iterdir()}
    assert (repos[REPO] / "model.safetensors").stat().st_size not in sizes  # neither a blob nor a partial file
    again = python(ERRORS, REPO, env=hub_env(stub.url, tmp_path, offline=True))
    assert again.stdout.startswith(f"{REPO} HubUnreachable"), again.stdout + again.stderr  # never loads


def test_unknown_gated_and_non_gpt2_repos_and_no_hub_each_fail_in_their_own_words(repos, tmp_path):
    stub = HubStub(repos, gated=("quill-test/gated",))
    try:
        r = python(ERRORS, "quill-test/nope", "quill-test/tiny-gpt2@v9", "quill-test/gated", "quill-test/llama",
                   "quill-test/no-weights", env=hub_env(stub.url, tmp_path))
        gated = python(ERRORS, "quill-test/gated", env={**hub_env(stub.url, tmp_path), "HF_TOKEN": "hf_test"})
    finally:
        stub.stop()
    assert r.returncode == 0, r.stderr
    assert gated.stdout == "quill-test/gated loaded\n", gated.stdout + gated.stderr  # HF_TOKEN opens it
    lines = dict(line.split(" ", 1) for line in r.stdout.splitlines())
    assert lines["quill-test/nope"].startswith(f"HubModelNotFound no model 'quill-test/nope' on the Hub at {stub.url}")
    assert lines["quill-test/tiny-gpt2@v9"].startswith("HubModelNotFound quill-test/tiny-gpt2 has no revision 'v9'")
    assert lines["quill-test/gated"].startswith("HubAccessDenied quill-test/gated is gated")
    assert "HF_TOKEN" in lines["quill-test/gated"]
    assert lines["quill-test/llama"].startswith("NotGPT2Checkpoint") and "model_type 'llama'" in lines["quill-test/llama"]
    assert lines["quill-test/no-weights"].startswith("NotGPT2Checkpoint") and "no weights" in lines["quill-test/no-weights"]
    # the wrong repos were refused from their listing and config alone: no weights were fetched
    assert not [p for m, p, _ in stub.requests if m == "GET" and p.endswith(".safetensors") and "llama" in p]
    assert not list((tmp_path / "hub").glob("models--quill-test--llama/blobs/*.incomplete"))

    # no Hub at all: the CLI says so in one line and exits 2; offline mode says that instead
    dead = f"http://127.0.0.1:{free_port()}"
    for env, words in ((hub_env(dead, tmp_path), f"cannot reach the Hub at {dead}"),
                       (hub_env(dead, tmp_path, offline=True), "HF_HUB_OFFLINE=1 forbids downloading")):
        out = quill("generate", "quill-test/elsewhere", "hi", "--max-tokens", "2", env=env)
        assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
        assert out.stderr.startswith("quill: error: ") and words in out.stderr


def test_server_pull_checks_the_repo_downloads_with_progress_then_serves_it(repos, tmp_path):
    import httpx
    import quill as q

    from conftest import ServerProcess

    admin = {"Authorization": "Bearer hub-admin"}
    stub = HubStub(repos, hold_once=("model.safetensors",))  # the weights wait at 90% until progress is seen
    server = ServerProcess(["--admin-key", "hub-admin", "--store", tmp_path / "store"], tmp_path / "server.log",
                           env=hub_env(stub.url, tmp_path / "hf")).wait_ready()
    try:
        for name, status, code in (("quill-test/nope", 404, "model_not_found"), ("no such/name", 400, "invalid_value"),
                                   ("quill-test/llama", 400, "not_a_gpt2_checkpoint")):
            r = httpx.post(f"{server.url}/v1/models/pull", json={"name": name}, headers=admin, timeout=60)
            assert r.status_code == status and r.json()["error"]["param"] == "name", r.text
            assert r.json()["error"]["code"] == code
        assert httpx.post(f"{server.url}/v1/models/pull", json={"name": REPO}, timeout=10).status_code == 401

        r = httpx.post(f"{server.url}/v1/models/pull", json={"name": REPO, "dtype": "bfloat16"}, headers=admin,
                       timeout=60)
        assert r.status_code == 202 and r.json()["status"] == "downloading", r.text
        total = r.json()["bytes_total"]
        assert total == sum(p.stat().st_size for p in repos[REPO].iterdir())
        seen, deadline = [], time.monotonic() + 120
        while time.monotonic() < deadline:
            pull = next(p for p in httpx.get(f"{server.url}/v1/hub/models", headers=admin, timeout=10).json()["pulls"]
                        if p["id"] == REPO)
            seen.append(pull["bytes_done"])
            if 0 < seen[-1] < total:
                stub.release()
            if pull["status"] in ("ready", "failed"):
                break
            time.sleep(0.2)
        assert pull["status"] == "ready", pull
        assert any(0 < b < total for b in seen) and seen == sorted(seen)  # progress, in order, to the end
        assert pull["bytes_done"] == total and pull["precision"] == "bfloat16"

        ids = q.load(repos[REPO]).tokenizer.encode(PROMPT)
        want = q.load(repos[REPO], dtype="bfloat16").generate(ids, 12, temperature=0).tokens
        r = httpx.post(f"{server.url}/v1/inference", json={"model": REPO, "tokens": ids, "max_tokens": 12,
                                                           "temperature": 0}, timeout=60)
        assert r.status_code == 200 and r.json()["choices"][0]["tokens"] == want, r.text
        family = httpx.get(f"{server.url}/v1/hub/models", headers=admin, timeout=10).json()["data"]
        assert {m["id"]: m["parameters"] for m in family}["gpt2-medium"] == "355M"

        # pulled again, now from the cache: nothing to download (all bytes there at once), loaded as int8
        asked = len(stub.requests)
        r = httpx.post(f"{server.url}/v1/models/pull", json={"name": REPO, "dtype": "int8"}, headers=admin,
                       timeout=60)
        assert r.status_code == 202 and r.json()["bytes_done"] == r.json()["bytes_total"] == total, r.text
        deadline = time.monotonic() + 60
        while pull["status"] not in ("ready", "failed") or pull["precision"] != "int8":
            assert time.monotonic() < deadline, pull
            time.sleep(0.2)
            pull = next(p for p in httpx.get(f"{server.url}/v1/hub/models", headers=admin, timeout=10).json()["pulls"]
                        if p["id"] == REPO)
        assert pull["status"] == "ready" and stub.requests[asked:] == []
        assert {m["id"]: m["precision"] for m in httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"]
                }[REPO] == "int8"
    finally:
        server.stop()
        stub.stop()


def test_a_full_disk_is_its_own_error_and_leaves_no_half_written_model(repos, tmp_path):
    """The cache on a 4 MB tmpfs (root only: skipped elsewhere) fills up during the 13 MB of weights."""
    cache = tmp_path / "small-disk"
    cache.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(cache)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root to mount a small tmpfs")
    stub = HubStub(repos)
    try:
        out = quill("pull", REPO, env=hub_env(stub.url, cache))
        assert out.returncode == 2, out.stderr
        last = out.stderr.rstrip("\n").rsplit("\n", 1)[-1]  # after the bars: the one-line error
        assert last.startswith(f"quill: error: the disk of the Hugging Face cache {cache / 'hub'} is full"), out.stderr
        assert "Traceback" not in out.stderr
        assert not list(cache.rglob("model.safetensors")) and not list(cache.rglob("*.incomplete"))
        again = python(ERRORS, REPO, env=hub_env(f"http://127.0.0.1:{free_port()}", cache, offline=True))
        assert again.stdout.startswith(f"{REPO} HubUnreachable"), again.stdout + again.stderr  # never loads half
    finally:
        stub.stop()
        subprocess.run(["umount", str(cache)], check=True)
