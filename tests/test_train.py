"""Training: config precedence, data preparation, learning, exact resume, export, DDP, and the bundled model.

Every run here is a tiny model on a short text (a few hundred steps at most), so the file stays well under a minute
on two CPU cores. The bundled-model test needs ../shared/data/tinyshakespeare.txt and skips without it.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from quill.errors import ConfigError
from quill.tokenizer import Tokenizer
from quill.train import checkpoint as ckpt_io
from quill.train.config import PRESETS, TrainConfig, build_config
from quill.train.data import BatchSampler, load_tokens, prepare, split_text
from quill.train.evaluate import sample, text_loss
from quill.train.trainer import Trainer, lr_at, train
from quill.weights import load_model

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
BUNDLED = REPO / "quill" / "models" / "shakespeare"

TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, batch_size=8, dropout=0.0, learning_rate=3e-3,
            min_lr=3e-4, warmup_iters=10, eval_iters=4, log_interval=1000, progress=False, threads=1)


def _text(n_lines: int = 600, seed: int = 0) -> str:
    """A small structured text: a simple grammar, so a tiny model can learn it well in a few hundred steps."""
    rng = random.Random(seed)
    who = ["the king", "a fool", "my lord", "the queen", "good sir"]
    verbs = ["speaks", "waits", "laughs", "weeps", "sleeps"]
    how = ["softly", "in the hall", "at night", "with grace", "alone"]
    return "".join(f"{rng.choice(who)} {rng.choice(verbs)} {rng.choice(how)}.\n" for _ in range(n_lines))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    (root / "text.txt").write_text(_text())
    prepare(root / "text.txt", root / "ds")
    return root / "ds"


def _quiet(_: str) -> None:
    pass


# ---- configuration -------------------------------------------------------------------------------------------


def test_config_precedence_preset_file_flags(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('learning_rate = 5e-4\n[model]\nn_layer = 3\nn_embd = 96\n')
    cfg = build_config("shakespeare-char", toml, {"n_embd": 48, "max-iters": 7})
    assert cfg.n_layer == 3 and cfg.learning_rate == 5e-4  # file over preset
    assert cfg.n_embd == 48 and cfg.max_iters == 7  # flags over file
    assert cfg.block_size == PRESETS["shakespeare-char"]["block_size"]  # preset over defaults
    js = tmp_path / "run.json"
    js.write_text(json.dumps({"warmup_iters": 3, "target_val_loss": 1}))
    cfg = build_config(None, js)
    assert cfg.warmup_iters == 3 and cfg.target_val_loss == 1.0 and cfg.n_layer == TrainConfig.n_layer


@pytest.mark.parametrize("values, field", [
    ({"n_layr": 2}, "n_layr"), ({"n_layer": "2"}, "n_layer"), ({"dropout": 1.5}, "dropout"),
    ({"n_embd": 30, "n_head": 4}, "n_embd"), ({"dtype": "int8"}, "dtype"), ({"batch_size": True}, "batch_size"),
])
def test_config_rejects_bad_values(values, field):
    with pytest.raises(ConfigError) as e:
        build_config(None, None, values)
    assert e.value.field == field


def test_config_file_is_parsed_never_executed(tmp_path):
    bad = tmp_path / "evil.json"
    bad.write_text('{"n_layer": "__import__(\'os\').system(\'false\')"}')
    with pytest.raises(ConfigError):
        build_config(None, bad)
    py = tmp_path / "x.py"
    py.write_text(f"open({str(tmp_path / 'ran')!r}, 'w')\n")
    with pytest.raises(ConfigError, match="json or .toml"):
        build_config(None, py)
    assert not (tmp_path / "ran").exists()


def test_cli_flags_override_and_register():
    import argparse

    from quill.train.cli import _overrides, register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["train", "--preset", "tiny", "--n-layer", "3", "--no-decay-lr",
                              "--target-val-loss", "none", "--learning-rate", "1e-3"])
    assert _overrides(args) == {"n_layer": 3, "decay_lr": False, "target_val_loss": None, "learning_rate": 1e-3}
    assert parser.parse_args(["prepare", "a.txt", "out"]).tokenizer == "char"
    assert parser.parse_args(["train-export", "ck", "out"]).dtype == "float32"


def test_lr_schedule_warmup_then_cosine_to_min():
    cfg = TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_iters=10, max_iters=110)
    lrs = [lr_at(cfg, i) for i in range(120)]
    assert lrs[0] < lrs[5] < lrs[9] < 1.0 and lrs[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:110], lrs[11:111]))
    assert lrs[60] == pytest.approx(0.55) and lrs[110] == lrs[119] == 0.1


# ---- data ----------------------------------------------------------------------------------------------------


def test_prepare_char_dataset(dataset):
    meta = json.loads((dataset / "meta.json").read_text())
    text = _text()
    train_text, val_text = split_text(text)
    assert len(train_text) == int(0.9 * len(text)) and train_text + val_text == text
    tok = Tokenizer.load(dataset)
    assert tok.vocab_size == meta["vocab_size"] == len(set(text))
    train_ids, val_ids = load_tokens(dataset, "train"), load_tokens(dataset, "val")
    assert train_ids.dtype == np.uint16 and len(train_ids) == meta["train_tokens"] == len(train_text)
    assert tok.decode(val_ids.tolist()) == val_text


def test_prepare_gpt2_bpe_dataset(tmp_path):
    (tmp_path / "t.txt").write_text(_text(50))
    meta = prepare(tmp_path / "t.txt", tmp_path / "bpe", tokenizer="gpt2")
    assert meta["vocab_size"] == 50257 and meta["eos_token_id"] == 50256
    tok = Tokenizer.load(tmp_path / "bpe")
    _, val_text = split_text(_text(50))
    assert tok.decode(load_tokens(tmp_path / "bpe", "val").tolist()) == val_text


def test_batch_sampler_resumes_exactly(dataset):
    tokens = load_tokens(dataset, "train")
    a = BatchSampler(tokens, 16, 4, seed=3)
    a.next()
    state = a.state_dict()
    x1, y1 = a.next()
    b = BatchSampler(tokens, 16, 4, seed=99)
    b.load_state_dict(state)
    x2, y2 = b.next()
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and torch.equal(x1[:, 1:], y1[:, :-1])


# ---- training ------------------------------------------------------------------------------------------------


def test_tiny_model_learns(dataset, tmp_path):
    cfg = TrainConfig(data=str(dataset), out_dir=str(tmp_path), max_iters=300, eval_interval=100, **TINY)
    trainer = train(cfg, log=_quiet)
    evals = trainer.history["eval"]
    vocab = json.loads((dataset / "meta.json").read_text())["vocab_size"]
    assert evals[0]["val_loss"] == pytest.approx(math.log(vocab), abs=0.3)  # untrained: ~uniform
    # the grammar has ~0.9 nats/char of entropy at most; ln(vocab) is ~3.2
    assert evals[-1]["val_loss"] < 0.4 * math.log(vocab)
    assert {"ckpt.pt", "best.pt", "log.json", "loss.png"} <= {p.name for p in tmp_path.iterdir()}
    log = json.loads((tmp_path / "log.json").read_text())
    assert len(log["train"]) == 300 and log["stopped"] == "reached max_iters"


def test_overfits_a_single_batch(tmp_path):
    # one window of random tokens: the sampler can only ever draw it, so the loss must go to ~0 (memorisation)
    rng = np.random.default_rng(0)
    data = tmp_path / "ds"
    data.mkdir()
    Tokenizer.characters("abcdefghijklmnop").save(data)
    rng.integers(0, 16, 33, dtype=np.uint16).tofile(data / "train.bin")
    rng.integers(0, 16, 33, dtype=np.uint16).tofile(data / "val.bin")
    (data / "meta.json").write_text(json.dumps({"vocab_size": 16}))
    cfg = TrainConfig(data=str(data), out_dir=str(tmp_path / "out"), max_iters=150, eval_interval=150,
                      **{**TINY, "batch_size": 4, "weight_decay": 0.0})
    trainer = train(cfg, log=_quiet)
    losses = [r["loss"] for r in trainer.history["train"]]
    assert losses[0] > 2.5 and losses[-1] < 0.05
    assert trainer.history["eval"][-1]["train_loss"] < 0.05


def test_resume_is_bit_identical(dataset, tmp_path):
    base = dict(data=str(dataset), eval_interval=10, lr_decay_iters=30, **{**TINY, "dropout": 0.1})
    full = train(TrainConfig(out_dir=str(tmp_path / "full"), max_iters=30, **base), log=_quiet)
    # the same run, stopped at step 20 and resumed from its checkpoint in a fresh Trainer
    train(TrainConfig(out_dir=str(tmp_path / "split"), max_iters=20, **base), log=_quiet)
    resumed = train(TrainConfig(out_dir=str(tmp_path / "split"), max_iters=30, init_from="resume", **base),
                    log=_quiet)
    assert [r["loss"] for r in resumed.history["train"]] == [r["loss"] for r in full.history["train"]]
    assert resumed.history["eval"][-1]["val_loss"] == full.history["eval"][-1]["val_loss"]
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_cuda_training_learns(dataset, tmp_path, dtype):
    """On a GPU, fp32, bf16 autocast and fp16 autocast with a GradScaler (unscaled before clipping) learn the
    grammar as the CPU run does, and the scaler's state reaches the checkpoint."""
    cfg = TrainConfig(data=str(dataset), out_dir=str(tmp_path), max_iters=300, eval_interval=100, device="cuda",
                      dtype=dtype, **TINY)
    trainer = train(cfg, log=_quiet)
    vocab = json.loads((dataset / "meta.json").read_text())["vocab_size"]
    assert trainer.history["eval"][-1]["val_loss"] < 0.4 * math.log(vocab)
    assert all(p.device.type == "cuda" for p in trainer.model.parameters())
    assert bool(ckpt_io.load(tmp_path / "ckpt.pt")["scaler"]) == (dtype == "float16")


def test_sigterm_checkpoints_and_resumes_bit_identically(dataset, tmp_path):
    import signal

    base = dict(data=str(dataset), eval_interval=10, max_iters=25, **{**TINY, "dropout": 0.1})
    full = train(TrainConfig(out_dir=str(tmp_path / "full"), **base), log=_quiet)

    def preempt(line: str) -> None:  # at the log line of step 13, a scheduler's SIGTERM arrives
        if line.startswith("step 13/"):
            os.kill(os.getpid(), signal.SIGTERM)

    cut = train(TrainConfig(out_dir=str(tmp_path / "cut"), **{**base, "log_interval": 13}), log=preempt)
    assert cut.iter == 13 and torch.load(tmp_path / "cut" / "ckpt.pt", weights_only=True)["iter"] == 13
    resumed = train(TrainConfig(out_dir=str(tmp_path / "cut"), init_from="resume", **base), log=_quiet)
    assert [r["loss"] for r in resumed.history["train"]] == [r["loss"] for r in full.history["train"]]
    assert [r["iter"] for r in resumed.history["eval"]] == [0, 10, 20, 25]
    assert resumed.history["eval"][-1]["val_loss"] == full.history["eval"][-1]["val_loss"]


def test_checkpoint_loads_with_weights_only(dataset, tmp_path):
    train(TrainConfig(data=str(dataset), out_dir=str(tmp_path), max_iters=5, eval_interval=5, **TINY), log=_quiet)
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert ckpt["iter"] == 5 and set(ckpt["rng"][0]) >= {"torch", "numpy", "python", "sampler"}
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a zip")
    with pytest.raises(Exception, match="not a readable training checkpoint"):
        ckpt_io.load(bad)


def test_export_matches_transformers(dataset, tmp_path):
    import transformers
    train(TrainConfig(data=str(dataset), out_dir=str(tmp_path / "run"), max_iters=20, eval_interval=20, **TINY),
          log=_quiet)
    ckpt_io.export(tmp_path / "run", tmp_path / "hf")
    ours = load_model(tmp_path / "hf")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    tok = Tokenizer.load(tmp_path / "hf")
    ids = torch.tensor([tok.encode("the king laughs softly.\nmy lord")])
    with torch.no_grad():
        a, b = ours(ids), theirs(ids).logits
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tok("the queen weeps.")["input_ids"] == tok.encode("the queen weeps.")
    assert len(sample(ours, tok, "the ", 20, temperature=0.8, seed=1)) == 20


def test_bfloat16_autocast_runs(dataset, tmp_path):
    cfg = TrainConfig(data=str(dataset), out_dir=str(tmp_path), max_iters=3, eval_interval=3, dtype="bfloat16",
                      **{**TINY, "eval_iters": 1})
    trainer = train(cfg, log=_quiet)
    assert all(math.isfinite(r["loss"]) for r in trainer.history["train"])
    with pytest.raises(ConfigError, match="float16 needs CUDA"):
        Trainer(cfg.replace(dtype="float16"))


_DDP_SCRIPT = """
import os, sys, torch
from quill.train.config import TrainConfig
from quill.train.trainer import train
cfg = TrainConfig(data=sys.argv[1], out_dir=sys.argv[2], max_iters=6, eval_interval=3, n_layer=1, n_head=2,
                  n_embd=32, block_size=16, batch_size=4, eval_iters=2, dropout=0.1, threads=1, progress=False)
t = train(cfg)
torch.save(t.model.state_dict(), f"{sys.argv[2]}/rank{t.dist.rank}.pt")
sys.stdout.flush(); sys.stderr.flush()
# Results are on disk: skip interpreter teardown, where gloo's threads rarely abort the process ("terminate
# called without an active exception", seen once in CI) even after the process group was destroyed.
os._exit(0)
"""


def test_torchrun_two_processes_keep_identical_weights(dataset, tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(_DDP_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), str(dataset), str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    if proc.returncode != 0 and re.search(r"address already in use|EADDRINUSE|rendezvous|Connection (reset|refused)",
                                          proc.stderr, re.I):
        # a free port picked by --standalone can be taken by another process before it binds: try once more
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=True)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=True)
    fresh = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert len(fresh["rng"]) == 2 and fresh["iter"] == 6  # rank 0 wrote one checkpoint with both ranks' RNG
    for name in r0:
        assert torch.equal(r0[name], r1[name]), name
    assert not torch.equal(r0["transformer.wte.weight"], r0["transformer.wte.weight"] * 0)


# ---- the bundled model ---------------------------------------------------------------------------------------


def _card_val_loss() -> float:
    card = (BUNDLED / "README.md").read_text()
    m = re.search(r"^val_loss:\s*([0-9.]+)", card, re.M)
    assert m, "model card front matter lacks val_loss"
    return float(m.group(1))


def test_bundled_model_files():
    assert (BUNDLED / "config.json").exists(), "bundled model not exported yet"
    sizes = sum(p.stat().st_size for p in BUNDLED.iterdir())
    assert sizes < 20 * 2**20
    model = load_model(BUNDLED)
    tok = Tokenizer.load(BUNDLED)
    assert model.config.vocab_size == tok.vocab_size == 65
    assert (BUNDLED / "loss.png").exists()
    assert _card_val_loss() <= 1.50  # the goal


@pytest.mark.skipif(not SHAKESPEARE.exists(), reason=f"{SHAKESPEARE} not present (only in the dev workspace)")
def test_bundled_model_val_loss_matches_card():
    # The card's number was computed by this same function (`text_loss`: every val character predicted once, in
    # consecutive windows of the full 256-token context) in float32. Recomputing it elsewhere differs only by
    # float summation order (thread count, BLAS kernels): ~1e-6 relative, so 5e-4 absolute is generous, while the
    # card rounds to 4 decimals (+-5e-5).
    text = SHAKESPEARE.read_text(encoding="utf-8")
    _, val_text = split_text(text, 0.1)
    model, tok = load_model(BUNDLED), Tokenizer.load(BUNDLED)
    loss = text_loss(model, tok, val_text)
    assert loss == pytest.approx(_card_val_loss(), abs=5e-4)
    # int8 weight-only quantisation (speed issue's quality bar): held-out perplexity within 1% of fp32
    from quill.quantize import quantize_model

    int8_loss = text_loss(quantize_model(model), tok, val_text)
    assert abs(math.exp(int8_loss - loss) - 1) <= 0.01, (loss, int8_loss)
