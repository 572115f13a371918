#!/usr/bin/env python3
"""Training speed: Quill's trainer against nanoGPT's training loop, same model, same batches, one run.

    python bench/train.py                                    # presets tiny and shakespeare-char, CPU
    python bench/train.py --presets shakespeare-char --steps 30

For each preset, Quill's `Trainer.train_step` and a reference loop written out below after nanoGPT's train.py
(`get_batch` stacking numpy slices, loss from the logits, GradScaler, clipping, fused-if-available AdamW with
decay and no-decay groups) train the same model (Quill's GPT, same initial weights) on random tokens of the
preset's shape. After a warm-up the two alternate in rounds of `--steps` steps, so that load from other
processes falls on both alike; the table reports medians of the per-step times. Results go to
docs/benchmarks/train.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from quill.train.config import build_config  # noqa: E402
from quill.train.trainer import Trainer, lr_at  # noqa: E402

VOCAB = 65  # the character vocabulary of tinyshakespeare


def random_dataset(folder: Path, tokens: int, seed: int = 0) -> Path:
    """A dataset folder of uniformly random character ids (speed does not depend on the text)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for split in ("train", "val"):
        rng.integers(0, VOCAB, tokens, dtype=np.uint16).tofile(folder / f"{split}.bin")
    (folder / "meta.json").write_text(json.dumps({"vocab_size": VOCAB}))
    return folder


class NanoGPTLoop:
    """nanoGPT's train.py inner loop around a given model (its get_batch, optimiser set-up and step)."""

    def __init__(self, model: torch.nn.Module, cfg, data: Path):
        self.model, self.cfg = model, cfg
        self.data = np.memmap(data / "train.bin", dtype=np.uint16, mode="r")
        decay = [p for p in model.parameters() if p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        # nanoGPT fuses AdamW on CUDA only; this benchmark runs on the CPU
        self.optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2))
        self.scaler = torch.amp.GradScaler("cpu", enabled=False)
        self.X, self.Y = self.get_batch()

    def get_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        b, t = self.cfg.batch_size, self.cfg.block_size
        ix = torch.randint(len(self.data) - t, (b,))
        x = torch.stack([torch.from_numpy(self.data[i:i + t].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(self.data[i + 1:i + 1 + t].astype(np.int64)) for i in ix])
        return x, y

    def step(self, lr: float) -> float:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        for _ in range(self.cfg.grad_accum):
            logits = self.model(self.X)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), self.Y.view(-1), ignore_index=-1)
            loss = loss / self.cfg.grad_accum
            self.X, self.Y = self.get_batch()  # nanoGPT prefetches the next batch while the GPU works
            self.scaler.scale(loss).backward()
        if self.cfg.grad_clip != 0.0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item() * self.cfg.grad_accum


def bench_preset(preset: str, steps: int, rounds: int, work: Path) -> dict:
    data = random_dataset(work / "data", 400_000)
    cfg = build_config(preset, None, {"data": str(data), "out_dir": str(work / f"out-{preset}"), "device": "cpu",
                                      "dtype": "float32", "compile": False, "progress": False, "grad_accum": 1})
    quill_trainer = Trainer(cfg, log=lambda _line: None)
    reference = NanoGPTLoop(copy.deepcopy(quill_trainer.model), cfg, data)
    loops = {"quill": quill_trainer.train_step, "nanoGPT loop": reference.step}
    times: dict[str, list[float]] = {name: [] for name in loops}
    for step in loops.values():  # warm-up
        for _ in range(3):
            step(lr_at(cfg, 100))
    for r in range(rounds):
        for name, step in loops.items():
            for _ in range(steps):
                t0 = time.perf_counter()
                step(lr_at(cfg, 100 + r))
                times[name].append(time.perf_counter() - t0)
    tokens = cfg.batch_size * cfg.block_size * cfg.grad_accum
    out = {"preset": preset, "params": quill_trainer.model.config.num_params(), "tokens_per_step": tokens,
           "config": {k: getattr(cfg, k) for k in ("n_layer", "n_head", "n_embd", "block_size", "batch_size",
                                                   "dropout")}, "threads": torch.get_num_threads(), "systems": {}}
    for name, ts in times.items():
        ms = 1e3 * statistics.median(ts)
        out["systems"][name] = {"ms_per_step": ms, "tokens_per_s": tokens / ms * 1e3, "samples_ms": [1e3 * t for t in ts]}
    quill_trainer.close()
    return out


def markdown(results: list[dict], when: str) -> str:
    lines = ["# Training speed: Quill's trainer and nanoGPT's loop", "",
             f"{when}; CPU, float32, random tokens, the same model and batch shape for both; median ms per optimiser "
             "step over the measured rounds (`python bench/train.py`).", "",
             "| preset | parameters | tokens/step | Quill ms/step | Quill tokens/s | nanoGPT loop ms/step | "
             "nanoGPT loop tokens/s | Quill / nanoGPT speed |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        q, n = r["systems"]["quill"], r["systems"]["nanoGPT loop"]
        lines.append(f"| {r['preset']} | {r['params'] / 1e6:.2f}M | {r['tokens_per_step']:,} | {q['ms_per_step']:.1f} | "
                     f"{q['tokens_per_s']:,.0f} | {n['ms_per_step']:.1f} | {n['tokens_per_s']:,.0f} | "
                     f"{n['ms_per_step'] / q['ms_per_step']:.2f}x |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", default="tiny,shakespeare-char", help="comma-separated preset names")
    p.add_argument("--steps", type=int, default=10, help="steps per system per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "docs" / "benchmarks"))
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        results = [bench_preset(name, args.steps, args.rounds, Path(tmp) / name) for name in args.presets.split(",")]
    when = time.strftime("%Y-%m-%d %H:%M")
    text = markdown(results, when)
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "train.json").write_text(json.dumps({"time": when, "results": results}, indent=1) + "\n")
    (out / "train.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
