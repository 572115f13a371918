"""The training loop: AdamW, warm-up + cosine schedule, gradient accumulation and clipping, mixed precision,
periodic evaluation, exact-resume checkpoints, early stopping, DDP, progress bar, JSON log and loss-curve PNG.

All state lives on a `Trainer` object built from a `TrainConfig` (no module globals), so runs can be started from
the CLI, from tests, or from a notebook alike.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import math
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from quill.atomic import atomic_write
from quill.errors import ConfigError
from quill.model import GPT, GPTConfig
from quill.train import checkpoint as ckpt_io
from quill.train import ddp
from quill.train.config import TrainConfig
from quill.train.data import BatchSampler, load_tokens, read_meta
from quill.weights import load_model

LOG_FILE = "log.json"
PLOT_FILE = "loss.png"
_EVAL_SEED = 0x5EED  # evaluation batches are the same at every evaluation: less noise between points


def lr_at(cfg: TrainConfig, it: int) -> float:
    """Linear warm-up to learning_rate, then cosine decay to min_lr at decay_iters (constant after)."""
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if not cfg.decay_lr:
        return cfg.learning_rate
    if it >= cfg.decay_iters:
        return cfg.min_lr
    ratio = (it - cfg.warmup_iters) / max(1, cfg.decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on parameters of 2+ dimensions (matmuls, embeddings) only, not on biases/LayerNorm.
    The fused implementation is used where this torch build offers it for the device, else foreach."""
    params = {id(p): p for p in model.parameters() if p.requires_grad}.values()  # tied weights once
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kwargs: dict[str, Any] = dict(lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2))
    if "fused" in inspect.signature(torch.optim.AdamW).parameters:
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except (RuntimeError, ValueError):
            pass
    return torch.optim.AdamW(groups, foreach=True, **kwargs)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' requested but CUDA is not available", "device")
    return device


def resume_config(out_dir: str | Path, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """The configuration stored in `out_dir/ckpt.pt`, with `overrides` (e.g. a longer max_iters) applied."""
    from quill.train.config import _normalise

    stored = ckpt_io.load(Path(out_dir) / ckpt_io.CKPT_FILE)["train_config"]
    values = {**stored, **_normalise(overrides or {}, "options")}
    values.update(init_from="resume", out_dir=str(out_dir))
    return TrainConfig(**values)


class Trainer:
    """One training run. `run()` trains to max_iters (or an early stop) and returns the history."""

    def __init__(self, cfg: TrainConfig, log: Callable[[str], None] | None = None):
        if not cfg.data:
            raise ConfigError("no dataset: pass --data DIR (a folder made by `quill prepare`)", "data")
        self.cfg = cfg
        self.dist = ddp.detect()
        self.device = ddp.setup(self.dist, resolve_device(cfg.device))
        self._print = log or (lambda s: print(s, flush=True))
        threads = cfg.threads or max(1, (os.cpu_count() or 1) // self.dist.local_world_size)
        torch.set_num_threads(threads)
        if cfg.dtype == "float16" and self.device.type != "cuda":
            raise ConfigError("dtype float16 needs CUDA (it relies on a GradScaler); use bfloat16 on CPU", "dtype")
        self.out_dir = Path(cfg.out_dir)
        if self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)

        self.meta = read_meta(cfg.data)
        self.train_tokens = load_tokens(cfg.data, "train")
        self.val_tokens = load_tokens(cfg.data, "val")

        state: dict[str, Any] | None = None
        if cfg.init_from == "resume":
            state = ckpt_io.load(self.out_dir / ckpt_io.CKPT_FILE)
            model_config = GPTConfig(**state["model_config"])
        elif cfg.init_from == "scratch":
            model_config = GPTConfig(
                vocab_size=self.meta["vocab_size"], n_positions=cfg.block_size, n_embd=cfg.n_embd,
                n_layer=cfg.n_layer, n_head=cfg.n_head, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout,
                attn_pdrop=cfg.attn_dropout, bos_token_id=self.meta.get("bos_token_id"),
                eos_token_id=self.meta.get("eos_token_id"))
        else:  # fine-tune a Hugging Face folder
            base = load_model(cfg.init_from)
            if base.config.vocab_size < self.meta["vocab_size"]:
                raise ConfigError(f"{cfg.init_from} has a vocabulary of {base.config.vocab_size}, smaller than the "
                                  f"dataset's {self.meta['vocab_size']}", "init_from")
            model_config = dataclasses.replace(base.config, resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout,
                                               attn_pdrop=cfg.attn_dropout)
        if cfg.block_size > model_config.n_positions:
            raise ConfigError(f"block_size {cfg.block_size} exceeds the model's context of "
                              f"{model_config.n_positions}", "block_size")

        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.model = GPT(model_config)
        if cfg.init_from == "scratch":
            # GPT-2's scaled init of residual projections: keeps the residual stream's variance flat in depth
            for name, p in self.model.named_parameters():
                if name.endswith("c_proj.weight"):
                    nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * model_config.n_layer))
        elif cfg.init_from != "resume":
            self.model.load_state_dict(base.state_dict())
        self.model.to(self.device).train()
        self.optimizer = make_optimizer(self.model, cfg, self.device)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=cfg.dtype == "float16")
        self.autocast_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(cfg.dtype)

        rank = self.dist.rank
        torch.manual_seed(cfg.seed + rank)  # dropout differs between ranks
        self.sampler = BatchSampler(self.train_tokens, cfg.block_size, cfg.batch_size,
                                    seed=cfg.seed * 1009 + rank + 1, device=self.device)
        self.iter = 0
        self.best_val = math.inf
        self.elapsed_before = 0.0
        self.history: dict[str, Any] = {"config": cfg.to_dict(), "train": [], "eval": []}
        self._skip_eval_at: int | None = None
        self._evaluated_at: int | None = None
        self._stop_signal: int | None = None
        if state is not None:
            self._restore(state)

        self.forward: nn.Module = self.model
        if cfg.compile:
            self.forward = torch.compile(self.model)
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            self.forward = DistributedDataParallel(
                self.forward, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    # ---- state ----------------------------------------------------------------------------------------------

    def _restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.model.to(self.device)
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.iter = state["iter"]
        self.best_val = state["best_val_loss"]
        self.elapsed_before = state.get("elapsed_s", 0.0)
        self.history["train"] = list(state["history"]["train"])
        self.history["eval"] = list(state["history"]["eval"])
        self._skip_eval_at = state.get("evaluated_at", self.iter)  # that evaluation is in the history already
        self._evaluated_at = self._skip_eval_at
        per_rank = state["rng"]
        if len(per_rank) == self.dist.world_size:
            mine = per_rank[self.dist.rank]
            ckpt_io.set_rng_state(mine)
            self.sampler.load_state_dict(mine["sampler"])
        elif self.dist.is_main:
            self._print(f"note: checkpoint was written by {len(per_rank)} processes, this run has "
                        f"{self.dist.world_size}; RNG streams restart (weights and optimiser resume exactly)")

    def _state(self, rngs: list[dict[str, Any]], elapsed: float) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
            "iter": self.iter,
            "evaluated_at": self._evaluated_at,
            "best_val_loss": self.best_val,
            "elapsed_s": elapsed,
            "model_config": dataclasses.asdict(self.model.config),
            "train_config": self.cfg.to_dict(),
            "meta": self.meta,
            "rng": rngs,
            "history": {"train": self.history["train"], "eval": self.history["eval"]},
        }

    # ---- pieces of a step -----------------------------------------------------------------------------------

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _loss(self, module: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            logits = module(x)
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean loss over eval_iters fixed random batches per split, shared out among the ranks."""
        self.model.eval()
        out = {}
        for split, tokens in (("train", self.train_tokens), ("val", self.val_tokens)):
            sampler = BatchSampler(tokens, self.cfg.block_size, self.cfg.batch_size, seed=_EVAL_SEED,
                                   device=self.device)
            total = torch.zeros(1, dtype=torch.float64, device=self.device)
            for i in range(self.cfg.eval_iters):
                x, y = sampler.next()
                if i % self.dist.world_size == self.dist.rank:
                    total += self._loss(self.model, x, y).double()
            out[split] = ddp.all_reduce_sum(total, self.dist).item() / self.cfg.eval_iters
        self.model.train()
        return out

    def train_step(self, lr: float) -> float:
        """One optimiser step over grad_accum micro-batches; returns the mean micro-batch loss."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        total = 0.0
        accum = self.cfg.grad_accum
        for micro in range(accum):
            x, y = self.sampler.next()
            sync = not self.dist.enabled or micro == accum - 1
            ctx = contextlib.nullcontext() if sync else self.forward.no_sync()
            with ctx:
                loss = self._loss(self.forward, x, y)
                self.scaler.scale(loss / accum).backward()
            total += loss.item()
        if self.cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return total / accum

    # ---- the loop -------------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        cfg, main = self.cfg, self.dist.is_main
        tokens_per_iter = cfg.batch_size * cfg.block_size * cfg.grad_accum * self.dist.world_size
        if main:
            n = self.model.config.num_params()
            self._print(f"model: {n / 1e6:.2f}M parameters, {self.model.config.n_layer} layers, "
                        f"n_embd {self.model.config.n_embd}, context {cfg.block_size}; {tokens_per_iter:,} tokens "
                        f"per step on {self.dist.world_size} process(es), {self.device}, {cfg.dtype}, "
                        f"{torch.get_num_threads()} threads; starting at step {self.iter}")
        show_bar = cfg.progress if cfg.progress is not None else sys.stderr.isatty()
        bar = None
        if main and show_bar:
            from tqdm import tqdm

            bar = tqdm(total=cfg.max_iters, initial=self.iter, unit="step", dynamic_ncols=True)
        say = (lambda s: bar.write(s)) if bar is not None else self._print
        start = time.perf_counter()
        window_t, window_n = start, 0
        previous = self._install_signal_handlers()
        try:
            while True:
                last = self.iter >= cfg.max_iters
                if (self.iter % cfg.eval_interval == 0 or last) and self.iter != self._skip_eval_at:
                    if self._evaluate_and_checkpoint(start, say):
                        break
                elif last:
                    break
                lr = lr_at(cfg, self.iter)
                loss = self.train_step(lr)
                if not math.isfinite(loss):
                    raise FloatingPointError(f"loss became {loss} at step {self.iter}; lower the learning rate")
                self.iter += 1
                window_n += 1
                self.history["train"].append({"iter": self.iter, "loss": loss, "lr": lr})
                if main and (self.iter % cfg.log_interval == 0 or bar is not None):
                    now = time.perf_counter()
                    tok_s = window_n * tokens_per_iter / max(now - window_t, 1e-9)
                    if bar is not None:
                        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tok_s:,.0f}", refresh=False)
                        bar.update(1)
                    if self.iter % cfg.log_interval == 0:
                        eta = (cfg.max_iters - self.iter) * tokens_per_iter / max(tok_s, 1e-9)
                        if bar is None:
                            say(f"step {self.iter}/{cfg.max_iters} | loss {loss:.4f} | lr {lr:.2e} | "
                                f"{tok_s:,.0f} tok/s | eta {_hms(eta)}")
                        window_t, window_n = now, 0
                interrupted = self._interrupted()
                if interrupted or (cfg.checkpoint_interval and self.iter % cfg.checkpoint_interval == 0
                                   and self.iter % cfg.eval_interval != 0 and self.iter < cfg.max_iters):
                    self._checkpoint(self.elapsed_before + time.perf_counter() - start)
                if interrupted:
                    if main:
                        say(f"stopping on signal {self._stop_signal or 'from rank 0'} at step {self.iter}: "
                            f"checkpoint saved, resume with --init-from resume")
                    break
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if bar is not None:
                bar.close()
        return self.history

    def _install_signal_handlers(self) -> dict:
        """SIGINT/SIGTERM finish the current step, write a checkpoint and stop (a preemptible run)."""
        if threading.current_thread() is not threading.main_thread():
            return {}

        def handler(signum, _frame):
            self._stop_signal = signum

        previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
        return previous

    def _interrupted(self) -> bool:
        flag = self._stop_signal is not None
        if self.dist.enabled:  # any rank's signal stops every rank at the same step
            t = torch.tensor([1.0 if flag else 0.0], device=self.device)
            flag = ddp.all_reduce_sum(t, self.dist).item() > 0
        return flag

    def _checkpoint(self, elapsed: float) -> None:
        """Write ckpt.pt for the current step (a collective: every rank must call it)."""
        rngs = ddp.gather_objects(ckpt_io.rng_state(self.sampler.state_dict()), self.dist)
        if self.dist.is_main:
            ckpt_io.save(self.out_dir / ckpt_io.CKPT_FILE, self._state(rngs, elapsed))
            self.write_log(elapsed, None)

    def _evaluate_and_checkpoint(self, start: float, say: Callable[[str], None]) -> bool:
        """Evaluate, record, checkpoint; returns whether training should stop."""
        cfg, main = self.cfg, self.dist.is_main
        losses = self.evaluate()
        elapsed = self.elapsed_before + time.perf_counter() - start
        tokens = self.iter * cfg.batch_size * cfg.block_size * cfg.grad_accum * self.dist.world_size
        self.history["eval"].append({"iter": self.iter, "train_loss": losses["train"], "val_loss": losses["val"],
                                     "elapsed_s": round(elapsed, 2), "tokens": tokens})
        self._evaluated_at = self.iter
        improved = losses["val"] < self.best_val
        if improved:
            self.best_val = losses["val"]
        reason = None
        if self.iter >= cfg.max_iters:
            reason = "reached max_iters"
        elif cfg.target_val_loss is not None and losses["val"] <= cfg.target_val_loss:
            reason = f"val loss {losses['val']:.4f} reached target {cfg.target_val_loss}"
        elif cfg.max_minutes is not None and ddp.broadcast_flag(elapsed > cfg.max_minutes * 60, self.dist,
                                                                 self.device):
            reason = f"time budget of {cfg.max_minutes} min used"
        if main:
            say(f"eval step {self.iter}: train {losses['train']:.4f}, val {losses['val']:.4f}"
                f"{' (best)' if improved else ''} | {_hms(elapsed)} elapsed")
        save = self.iter > 0 and (cfg.always_save_checkpoint or improved or reason is not None)
        rngs = ddp.gather_objects(ckpt_io.rng_state(self.sampler.state_dict()), self.dist) if save else []
        if main:
            if improved and self.iter > 0:
                ckpt_io.save(self.out_dir / ckpt_io.BEST_FILE, {
                    "model": self.model.state_dict(), "model_config": dataclasses.asdict(self.model.config),
                    "train_config": self.cfg.to_dict(), "iter": self.iter, "val_loss": losses["val"]})
            if save:
                ckpt_io.save(self.out_dir / ckpt_io.CKPT_FILE, self._state(rngs, elapsed))
            self.write_log(elapsed, reason)
        if reason and main:
            say(f"stopping: {reason}")
        return reason is not None

    def write_log(self, elapsed: float, reason: str | None = None) -> None:
        log = {**self.history, "best_val_loss": self.best_val, "iter": self.iter, "elapsed_s": round(elapsed, 2),
               "stopped": reason, "model_config": dataclasses.asdict(self.model.config)}
        atomic_write(self.out_dir / LOG_FILE, lambda p: p.write_text(json.dumps(log) + "\n"))
        from quill.train.plot import plot_losses

        plot_losses(self.history, self.out_dir / PLOT_FILE)

    def close(self) -> None:
        ddp.teardown()


def _hms(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def train(cfg: TrainConfig, log: Callable[[str], None] | None = None) -> Trainer:
    """Build a Trainer, run it, tear down the process group; returns the trainer (history, model)."""
    trainer = Trainer(cfg, log)
    try:
        trainer.run()
    finally:
        trainer.close()
    return trainer


__all__ = ["Trainer", "train", "lr_at", "make_optimizer", "resume_config"]
