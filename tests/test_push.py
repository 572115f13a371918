"""`quill push` rides out a server restart: the server is killed (-9) mid-upload and started again seconds later,
and the same push run continues from the server's offset, publishes, and the model generates like the folder."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import httpx

from conftest import ROOT, ServerProcess, free_port, make_tiny_model

K = "push-admin-key"
AUTH = {"Authorization": f"Bearer {K}"}
PROMPT = "Hello there"


def test_push_keeps_going_through_a_kill_9_and_restart_of_the_server(tmp_path):
    import quill

    model = make_tiny_model(tmp_path / "model", n_embd=128, n_layer=3, n_positions=256)  # ~2.5 MB of weights
    store, port = tmp_path / "store", free_port()

    def start(run: int) -> ServerProcess:
        return ServerProcess(["--store", store, "--admin-key", K], tmp_path / f"server-{run}.log", port=port)

    server = start(1).wait_ready()
    env = {**os.environ, "QUILL_PUSH_RESUME": str(tmp_path / "resume.json"), "PYTHONPATH": str(ROOT)}
    push = subprocess.Popen([sys.executable, "-m", "quill.cli", "push", str(model), "survivor", "--url", server.url,
                             "--admin-key", K, "--chunk-size", "16KiB", "--retry-for", "120"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        weights = (model / "model.safetensors").stat().st_size
        deadline, offset = time.monotonic() + 120, 0
        while not 0 < offset < weights // 2 and time.monotonic() < deadline:  # mid-way through the weights
            assert push.poll() is None, push.communicate()
            ups = httpx.get(f"{server.url}/v1/uploads?model=survivor", headers=AUTH, timeout=10).json()["data"]
            offset = max((u["offset"] for u in ups if u["filename"] == "model.safetensors"), default=0)
            time.sleep(0.02)
        assert 0 < offset < weights // 2
        server.kill9()
        time.sleep(6)  # the server is away for several seconds: the push must wait, not give up
        assert push.poll() is None
        server = start(2).wait_ready()
        out, err = push.communicate(timeout=300)
    finally:
        if push.poll() is None:
            push.kill()
        server.stop()
    assert push.returncode == 0, err
    assert out.startswith("published survivor: ")
    assert "retrying for up to 120 s" in err
    resumed = [line for line in err.splitlines() if "model.safetensors: the server has" in line]
    assert resumed and int(resumed[0].split("has ")[1].split(" of")[0]) >= offset  # continued, did not start over
    want = quill.load(model).generate(PROMPT, 12, temperature=0).tokens
    assert quill.load(store / "survivor").generate(PROMPT, 12, temperature=0).tokens == want
