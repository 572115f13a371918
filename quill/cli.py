"""The `quill` command. Each subcommand is a thin shell over the library; errors are one line and exit 2.

Subsystems with commands of their own (serving, uploads, export, training) expose `register(subparsers)`
and are listed in COMMAND_MODULES, so each keeps its flags beside its code; they are loaded by name and
import nothing from this module (shared flags live in quill/cli_flags.py). The benchmarks are scripts in
bench/ of a source checkout, not commands.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from quill.cli_flags import KV_CACHE_HELP, MODEL_HELP, add_load_flags

COMMAND_MODULES: tuple[str, ...] = ("quill.server.cli", "quill.push", "quill.catalog", "quill.export",
                                    "quill.train.cli")


def add_model_args(p: argparse.ArgumentParser) -> None:
    """MODEL plus how to load it: shared by every command that loads a model."""
    p.add_argument("model", help=MODEL_HELP)
    add_load_flags(p)


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    """The sampling controls of `SamplingParams` as flags."""
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0, help="0 means greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--typical-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--no-repeat-ngram-size", type=int, default=0)
    p.add_argument("--min-tokens", type=int, default=0)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g = p.add_argument_group("search strategies (instead of sampling; see quill.search)")
    g.add_argument("--num-beams", type=int, default=None, help="beam search with this many beams")
    g.add_argument("--num-beam-groups", type=int, default=None, help="diverse beam search: groups of beams")
    g.add_argument("--diversity-penalty", type=float, default=None, help="diverse beam search: penalty per reuse")
    g.add_argument("--length-penalty", type=float, default=None, help="beam score = log-prob / length**this")
    g.add_argument("--early-stopping", choices=("true", "false", "never"), default=None,
                   help="when beam search stops (transformers' meaning)")
    g.add_argument("--penalty-alpha", type=float, default=None, help="contrastive search (with --top-k candidates)")


def sampling_kwargs(args: argparse.Namespace) -> dict:
    """SamplingParams keywords from the flags, plus the search keywords that were given."""
    from quill.search import SEARCH_FIELDS

    names = ("temperature", "top_k", "top_p", "min_p", "typical_p", "repetition_penalty", "presence_penalty",
             "frequency_penalty", "no_repeat_ngram_size", "min_tokens", "ignore_eos", "seed")
    out = {n: getattr(args, n) for n in names}
    out.update({n: getattr(args, n) for n in SEARCH_FIELDS if getattr(args, n, None) is not None})
    if "early_stopping" in out:
        out["early_stopping"] = {"true": True, "false": False}.get(out["early_stopping"], out["early_stopping"])
    return out


def constraint_kwargs(args: argparse.Namespace) -> dict:
    """The structured-output keywords of `Engine.generate` from --json-schema, --regex, --choice, --grammar."""
    out = {"regex": args.regex, "choice": args.choice}
    if args.json_schema is not None:
        text = args.json_schema  # a schema is an object: '{...}' is the schema itself, anything else a file
        out["json_schema"] = text if text.lstrip().startswith("{") else _read_arg(Path(text), "json_schema")
    if args.grammar is not None:
        out["grammar"] = _read_arg(Path(args.grammar), "grammar")
    return {k: v for k, v in out.items() if v is not None}


def _read_arg(path: Path, param: str) -> str:
    from quill.errors import InvalidParameter

    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidParameter(f"cannot read {param} file {path}: {e}", param) from e


def load_engine(args: argparse.Namespace):
    import quill

    return quill.load(args.model, dtype=args.dtype, device=args.device, compile=args.compile, kv_cache=args.kv_cache)


def cmd_generate(args: argparse.Namespace) -> None:
    from platformdirs import user_data_dir

    from quill.continuation import ContinuationStore
    from quill.errors import InvalidParameter

    if (args.prompt is None) == (args.continue_from is None):
        raise InvalidParameter("give a prompt or --continue HANDLE (not both)", "prompt")
    engine = load_engine(args)
    # Handles must outlive this process: keep paused generations in the user's data directory.
    engine.continuations = ContinuationStore(Path(user_data_dir("quill")) / "continuations")
    if args.continue_from is not None:
        out = engine.generate(continuation=args.continue_from, max_flops=args.max_flops)
        print(out.text)
    elif args.stream and args.max_flops is None:
        for piece in engine.stream(args.prompt, args.max_tokens, stop=args.stop, **sampling_kwargs(args),
                                   **constraint_kwargs(args)):
            print(piece, end="", flush=True)
        print()
        return
    else:
        out = engine.generate(args.prompt, args.max_tokens, stop=args.stop, max_flops=args.max_flops,
                              **sampling_kwargs(args), **constraint_kwargs(args))
        print(out.text)
    u = out.usage
    print(f"[{u.prompt_tokens} prompt + {u.completion_tokens} generated tokens, {u.flops:,} FLOPs, "
          f"{u.seconds:.2f} s, {u.completion_tokens / max(u.seconds, 1e-9):.1f} tok/s, "
          f"finish: {out.finish_reason}]", file=sys.stderr)
    if out.continuation:
        print(f"[budget spent: continue with  quill generate {args.model} --continue {out.continuation} "
              f"--max-flops N]", file=sys.stderr)


def cmd_tokenize(args: argparse.Namespace) -> None:
    from quill.resolve import resolve
    from quill.tokenizer import Tokenizer

    tok = Tokenizer.gpt2() if args.model == "gpt2" else Tokenizer.load(resolve(args.model))
    ids = tok.encode(args.text)
    print(json.dumps({"ids": ids, "pieces": [tok.id_to_piece(i) for i in ids]}, ensure_ascii=False))


def cmd_info(args: argparse.Namespace) -> None:
    from quill.errors import InvalidParameter

    info: dict = {}
    if args.model is not None:
        from quill.resolve import resolve
        from quill.weights import load_config

        path = resolve(args.model)
        cfg = load_config(path)
        n = cfg.num_params()
        info = {"path": str(path), "config": cfg.to_hf(), "parameters": n,
                "bytes": {"float32": 4 * n, "bfloat16": 2 * n, "int8": n}}
    elif not args.system:
        raise InvalidParameter("quill info needs a MODEL, --system, or both", "model")
    if args.system:
        from quill import kernels

        info["system"] = kernels.system_report()
    print(json.dumps(info, indent=2))


def cmd_quantize(args: argparse.Namespace) -> None:
    import torch

    from quill.errors import InvalidParameter
    from quill.quantize import quantization_config, quantize_model, save_quantized
    from quill.resolve import resolve
    from quill.weights import load_model

    src = resolve(args.model)
    if quantization_config(src) is not None:
        raise InvalidParameter(f"{src} is already quantised", "model")
    model = load_model(src, torch.float32)
    quantize_model(model, args.mode)
    save_quantized(model, args.out, source=src)
    size = sum(f.stat().st_size for f in Path(args.out).iterdir() if f.suffix == ".safetensors")
    print(json.dumps({"out": str(args.out), "mode": args.mode, "bytes": size}))


def cmd_eval(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    engine = load_engine(args)
    text = Path(args.text).read_text()
    ids = engine.tokenizer.encode(text)
    with tqdm(total=max(len(ids) - 1, 0), unit="tok", desc="scoring") as bar:
        score = engine.score(ids, stride=args.stride, progress=bar.update)
    print(json.dumps({"tokens": len(score.tokens), "scored": len(score.logprobs), "mean_nll": score.mean_nll,
                      "perplexity": score.perplexity}))


def cmd_cost(args: argparse.Namespace) -> None:
    from quill.costtable import ModelSpec, measure, parse_lengths
    from quill.resolve import resolve

    inputs, outputs = parse_lengths(args.inputs, "inputs"), parse_lengths(args.outputs, "outputs")
    spec = ModelSpec(str(resolve(args.model)), args.dtype, args.quantize, args.kv_cache)
    table = measure(spec, inputs, outputs, instructions=args.instructions, no_cache=args.no_cache,
                    counter=args.counter)
    if args.json:
        print(json.dumps([c.to_json() for c in table], indent=2))
        return
    columns = ["input_tokens", "output_tokens", "flops", "flops_no_cache", "seconds", "instructions",
               "instructions_no_cache", "counter"]
    rows = [c.to_json() for c in table]
    columns = [k for k in columns if k in rows[0]]
    print("\t".join(columns))
    for row in rows:
        print("\t".join(f"{row[k]:.4f}" if k == "seconds" else f"{row[k]:,}" if k != "counter" else row[k]
                        for k in columns))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="quill", description="Fast GPT-2-family inference, serving and training.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="generate text from a prompt")
    add_model_args(p)
    p.add_argument("prompt", nargs="?", help="the prompt (omit with --continue)")
    add_sampling_args(p)
    g = p.add_argument_group("structured output (one at a time; docs/structured.md)")
    g.add_argument("--json-schema", metavar="FILE|JSON", default=None, help="the output is JSON following this schema")
    g.add_argument("--regex", default=None, help="the whole output matches this regular expression")
    g.add_argument("--choice", action="append", default=None, help="the output is one of these (repeatable)")
    g.add_argument("--grammar", metavar="FILE", default=None, help="the output follows this Lark or GBNF grammar")
    p.add_argument("--stream", action="store_true", help="print text as it is generated")
    p.add_argument("--max-flops", type=int, default=None, help="FLOP budget of this call")
    p.add_argument("--continue", dest="continue_from", metavar="HANDLE", default=None,
                   help="resume a generation that its budget ended")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("tokenize", help="show the token ids and pieces of a text")
    p.add_argument("model", help="a MODEL as for generate; 'gpt2' is the built-in GPT-2 tokenizer (no download)")
    p.add_argument("text")
    p.set_defaults(func=cmd_tokenize)

    p = sub.add_parser("info", help="config, parameter count and size of a model; --system: CPU and kernels")
    p.add_argument("model", nargs="?", help=MODEL_HELP)
    p.add_argument("--system", action="store_true",
                   help="the CPU, its SIMD flags and the kernel variant chosen (QUILL_ISA overrides it)")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("eval", help="perplexity of a text with a sliding window")
    add_model_args(p)
    p.add_argument("--text", required=True, help="text file to score")
    p.add_argument("--stride", type=int, default=None, help="window step in tokens (default: the context)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("quantize", help="write an int8 (weight-only, per-channel) copy of a model")
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("out", help="output folder (loadable with quill.load / --model)")
    # int8 is the only mode so far: the flag names it explicitly and is what a second mode will sit beside
    p.add_argument("--int8", dest="mode", action="store_const", const="int8", default="int8",
                   help="int8 weights, fp32 per-channel scales (the default)")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("cost", help="FLOPs, wall time and counted instructions of calls (docs/cost.md)")
    p.add_argument("model", help=MODEL_HELP)
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16 (default float32)")
    p.add_argument("--quantize", default=None, choices=("int8",), help="quantise the weights on load")
    p.add_argument("--kv-cache", default=None, metavar="DTYPE", help=KV_CACHE_HELP)
    p.add_argument("--inputs", default="1,2,4,8,16,32,64,128", help="prompt lengths, comma-separated")
    p.add_argument("--outputs", default="1,2,4,8", help="generated lengths, comma-separated")
    p.add_argument("--instructions", action="store_true",
                   help="count each call's instructions: with the CPU's hardware counter where the machine exposes "
                   "one, else under valgrind's callgrind (slow, docs/cost.md)")
    p.add_argument("--no-cache", action="store_true",
                   help="also count the instructions of a real run without KV cache (implies --instructions)")
    p.add_argument("--counter", default="auto", choices=("auto", "perf", "callgrind"),
                   help="what counts instructions: perf (the hardware counter), callgrind, or auto (perf where "
                   "it opens; the default)")
    p.add_argument("--json", action="store_true", help="JSON rows instead of a table")
    p.set_defaults(func=cmd_cost)

    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run one subcommand, turning Quill's typed errors into a one-line message and exit 2."""
    from quill.errors import QuillError

    args = build_parser().parse_args(argv)
    # huggingface_hub logs each retry of a failing request; an error is to be one line (its bars show progress)
    os.environ.setdefault("HF_HUB_VERBOSITY", "error")
    try:
        args.func(args)
    except (QuillError, FileNotFoundError, IsADirectoryError) as e:
        print(f"quill: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
