"""`quill prepare`, `quill train` and `quill train-export`: flags for every `TrainConfig` field.

`register(subparsers)` adds the three subcommands to Quill's CLI; `python -m quill.train ...` runs them standalone.
Precedence: explicit flags > `--config FILE` (JSON or TOML) > `--preset NAME` > defaults. Run under
`torchrun --nproc_per_node N -m quill.train train ...` for distributed data parallel.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing

from quill.train.config import PRESETS, TrainConfig

FIELD_HELP = {
    "data": "prepared dataset folder (from `prepare`)",
    "out_dir": "folder for ckpt.pt, best.pt, log.json, loss.png",
    "init_from": "scratch, resume (from OUT_DIR/ckpt.pt), or a Hugging Face GPT-2 folder to fine-tune",
    "dropout": "residual and embedding dropout",
    "attn_dropout": "attention dropout (slows CPU attention)",
    "batch_size": "sequences per micro-batch, per process",
    "grad_accum": "micro-batches per optimiser step, per process",
    "lr_decay_iters": "end of the cosine decay (default: max_iters)",
    "decay_lr": "cosine-decay the learning rate (else constant after warm-up)",
    "weight_decay": "AdamW weight decay of 2-D weights",
    "grad_clip": "max global gradient norm (0: no clipping)",
    "eval_interval": "steps between evaluations and checkpoints",
    "eval_iters": "batches per split per evaluation",
    "checkpoint_interval": "also checkpoint (without evaluating) every N steps",
    "target_val_loss": "stop once the val loss is at or below this",
    "max_minutes": "stop (with a checkpoint) at the first evaluation past this many minutes",
    "dtype": "float32, bfloat16 (autocast) or float16 (autocast + GradScaler, CUDA only)",
    "device": "auto, cpu or cuda",
    "threads": "CPU threads (default: cores / processes on this machine)",
    "progress": "show a progress bar (default: when stderr is a terminal)",
}


def _parse_optional(kind):
    def parse(text: str):
        if text.lower() in ("none", "null"):
            return None
        return kind(text)

    parse.__name__ = kind.__name__
    return parse


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=sorted(PRESETS), help="named starting configuration")
    p.add_argument("--config", metavar="FILE", help="JSON or TOML file of options (overrides the preset)")
    p.add_argument("--export", metavar="DIR", help="after training, export the best model to DIR (HF format)")
    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        tp = hints[f.name]
        args = typing.get_args(tp) if isinstance(tp, types.UnionType) else (tp,)
        base = next(a for a in args if a is not type(None))
        help_ = FIELD_HELP.get(f.name, "") + f" (default: {f.default})"
        if base is bool:
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                           help=help_)
        else:
            kind = _parse_optional(base) if type(None) in args else base
            p.add_argument(flag, dest=f.name, type=kind, default=argparse.SUPPRESS, metavar=base.__name__.upper(),
                           help=help_)


def _overrides(args: argparse.Namespace) -> dict:
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return {k: v for k, v in vars(args).items() if k in names}


def cmd_train(args: argparse.Namespace) -> None:
    from quill.train.checkpoint import export
    from quill.train.config import build_config, load_file
    from quill.train.trainer import resume_config, train

    overrides = _overrides(args)
    if overrides.get("init_from") == "resume":
        # the stored run's configuration, with the file's and the flags' changes on top
        file_values = load_file(args.config) if args.config else {}
        out_dir = overrides.get("out_dir") or file_values.get("out_dir") or TrainConfig.out_dir
        cfg = resume_config(out_dir, {**file_values, **overrides})
    else:
        cfg = build_config(args.preset, args.config, overrides)
    trainer = train(cfg)
    if args.export and trainer.dist.is_main:
        export(cfg.out_dir, args.export, cfg.data)
        print(f"exported to {args.export}")


def cmd_prepare(args: argparse.Namespace) -> None:
    from quill.train.data import prepare

    meta = prepare(args.text, args.out, tokenizer=args.tokenizer, val_fraction=args.val_fraction)
    print(json.dumps(meta, indent=2))


def cmd_export(args: argparse.Namespace) -> None:
    import torch

    from quill.train.checkpoint import export

    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.dtype]
    export(args.checkpoint, args.out, args.data, dtype=dtype)
    print(f"exported {args.checkpoint} to {args.out}")


def register(subparsers) -> None:
    """Add `prepare`, `train` and `train-export` to an argparse subparsers object (from add_subparsers())."""
    p = subparsers.add_parser("prepare", help="tokenise a text file into a training dataset",
                              description="Tokenise TEXT (character-level or GPT-2 BPE) into OUT/train.bin and "
                                          "OUT/val.bin (uint16), with the tokenizer and meta.json beside them.")
    p.add_argument("text", help="UTF-8 text file")
    p.add_argument("out", help="dataset folder to write")
    p.add_argument("--tokenizer", choices=("char", "gpt2"), default="char")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of the text held out (default 0.1)")
    p.set_defaults(func=cmd_prepare)

    p = subparsers.add_parser("train", help="train a GPT-2-style model",
                              description="Train a GPT on a prepared dataset. Flags override --config FILE, which "
                                          "overrides --preset. Under torchrun this runs data parallel.")
    add_train_args(p)
    p.set_defaults(func=cmd_train)

    p = subparsers.add_parser("train-export", help="export a training checkpoint as a Hugging Face folder",
                              description="Write config.json, model.safetensors and the tokenizer of a training "
                                          "checkpoint (a .pt file, or an out_dir: its best.pt, else ckpt.pt).")
    p.add_argument("checkpoint", help="ckpt.pt / best.pt, or a training out_dir")
    p.add_argument("out", help="folder to write")
    p.add_argument("--data", help="dataset folder whose tokenizer to include (default: the run's)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    p.set_defaults(func=cmd_export)


def main(argv: list[str] | None = None) -> int:
    from quill.errors import QuillError

    parser = argparse.ArgumentParser(prog="python -m quill.train")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (QuillError, FileNotFoundError, IsADirectoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


__all__ = ["register", "main", "add_train_args"]
