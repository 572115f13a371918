"""Shared fixtures: tiny random checkpoint folders and real `quill serve` processes on loopback.

- `make_tiny_model(folder, tokenizer=..., **config)`: a random-initialised transformers GPT-2 plus a tokenizer
  saved beside it (a character tokenizer by default: small vocabulary, fast);
- `tiny_model_dir` (character tokenizer with a Jinja chat template) and `tiny_gpt2_dir` (the GPT-2 tokenizer,
  no chat template): session-scoped folders;
- `serve(*args)`: starts `python -m quill.cli serve ... --port <free port>` and returns a `ServerProcess`
  (call `.wait_ready()`); every process it started is stopped at the end of the session.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never reach a hub
# Hermetic: the default model store, continuation handles and `quill push` resume files go to a scratch folder
# for this test session (servers started below inherit it), never to the user's home.
_SCRATCH = tempfile.mkdtemp(prefix="quill-tests-")
os.environ["XDG_DATA_HOME"] = os.path.join(_SCRATCH, "data")
os.environ["XDG_CACHE_HOME"] = os.path.join(_SCRATCH, "cache")
# Deterministic paths: multi-row products take the fixed default instead of timing candidates
# (tests/test_kernel_dispatch.py switches the tuner on where it is the subject).
os.environ.setdefault("QUILL_TUNE", "0")

import httpx
import pytest

from quill import kernels
from quill.kernels import build
from quill.kernels.cpu import AVX2, VARIANTS, Variant, this_cpu

CHARS = "abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"-\n<>|/"
CHAT_TEMPLATE = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}<assistant>"
ROOT = Path(__file__).resolve().parents[1]


def make_tiny_model(folder: str | os.PathLike, tokenizer: str = "chars", chat_template: str | None = None,
                    seed: int = 0, **config) -> Path:
    """Save a random GPT-2 (n_embd 32, 2 layers, 2 heads by default) and its tokenizer into `folder`.

    tokenizer: "chars" (a character tokenizer over CHARS; eos = bos = '|') or "gpt2" (the 50257-token GPT-2
    BPE). A larger `initializer_range` (default 0.2) keeps greedy choices well separated.
    """
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from quill.tokenizer import Tokenizer

    folder = Path(folder)
    if tokenizer == "chars":
        tok = Tokenizer.characters(CHARS)
        eos = tok.token_to_id("|")
    elif tokenizer == "gpt2":
        tok = Tokenizer.gpt2()
        eos = tok.eos_token_id
    else:
        raise ValueError(f"unknown tokenizer {tokenizer!r}")
    if chat_template is not None:
        tok = dataclasses.replace(tok, chat_template=chat_template)
    kw = dict(n_embd=32, n_layer=2, n_head=2, n_positions=128, initializer_range=0.2)
    kw.update(config)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=tok.vocab_size, bos_token_id=eos, eos_token_id=eos, **kw))
    model.save_pretrained(folder)
    tok.save(folder)
    return folder


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module: tiny models run fastest so (far faster than two on a busy machine)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def emulated_avx512() -> Variant:
    """The AVX-512 BF16 variant's code on an AVX2 CPU: the intrinsics emulated in C (tests/avx512_emulated.h)."""
    header = ROOT / "tests" / "avx512_emulated.h"
    digest = hashlib.sha256(header.read_bytes()).hexdigest()[:16]  # a changed header builds afresh
    return Variant("avx512-emulated", AVX2.needs,
                   (*AVX2.cflags, "-DQUILL_AVX512=1", "-DQUILL_AVX512_BF16=1", f"-DQUILL_EMULATED={digest}",
                    "-include", str(header), "-Wno-psabi"),
                   "the AVX-512 BF16 variant with emulated intrinsics (tests only)")


@pytest.fixture(params=[*sorted(VARIANTS), "avx512-emulated"])
def kernel_isa(request, monkeypatch):
    """Run the test once per kernel variant (QUILL_ISA), skipping a variant whose CPU flags this CPU lacks, and
    once on the AVX-512 variant's code with emulated intrinsics (so its logic is tested on any AVX2 CPU)."""
    if request.param == "avx512-emulated":
        variant = emulated_avx512()
        if this_cpu().missing(variant) or not kernels.available():
            pytest.skip("the emulated AVX-512 variant runs on the AVX2 kernels' CPUs")
        lib = kernels._bind(ctypes.CDLL(str(build.build(variant).path)))
        for name, value in (("_lib", lib), ("_variant", variant), ("_error", None), ("_tried", True)):
            monkeypatch.setattr(kernels, name, value)
        yield variant.name
        monkeypatch.undo()
        kernels.reload()
        return
    variant = VARIANTS[request.param]
    missing = this_cpu().missing(variant)
    if missing:
        pytest.skip(f"{variant.name} kernels need CPU flags this CPU lacks: {', '.join(missing)}")
    monkeypatch.setenv("QUILL_ISA", variant.name)
    kernels.reload()
    yield variant.name
    monkeypatch.undo()
    kernels.reload()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """Character-level tiny model (context 128) whose tokenizer has a Jinja chat template."""
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny", chat_template=CHAT_TEMPLATE)


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> Path:
    """Tiny model with the real GPT-2 tokenizer (vocab 50257, context 64) and no chat template."""
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-gpt2", tokenizer="gpt2", n_positions=64)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A `quill serve` subprocess on 127.0.0.1; its output goes to `log`."""

    def __init__(self, args: list[str], log: Path, port: int | None = None, env: dict[str, str] | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        # offline unless a test points the server at its own stand-in Hub (tests/hubstub.py)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
        cmd = [sys.executable, "-m", "quill.cli", "serve", *map(str, args), "--host", "127.0.0.1",
               "--port", str(self.port), "--threads", "1", "--log-level", "warning"]
        self._out = open(log, "wb")
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=self._out, stderr=subprocess.STDOUT)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_ready(self, timeout: float = 90.0) -> ServerProcess:
        """Poll GET /health until it answers 200 (fails early if the process exits)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server not ready after {timeout} s:\n{self.output()}")

    def kill9(self) -> None:
        """SIGKILL: no shutdown handlers run (a crash, as far as the server's files can tell)."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        self._out.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._out.close()


@pytest.fixture(scope="session")
def serve(tmp_path_factory):
    """Factory: `serve(MODEL, "--api-key", "k", ...)` starts a server (not yet ready: call `.wait_ready()`)."""
    started: list[ServerProcess] = []

    def start(*args) -> ServerProcess:
        log = tmp_path_factory.mktemp("server") / "server.log"
        server = ServerProcess(list(args), log)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()
