"""Numbers for a model card: the exact validation loss of an exported model and a few samples.

    python -m quill.train.card MODEL_DIR TEXT_FILE [--val-fraction 0.1] [--prompt "ROMEO:"] [--tokens 300]

prints JSON: val_loss (nats/token, every held-out token predicted once; see `quill.train.evaluate.text_loss`),
train_loss on the same footing, the parameter count, and greedy and temperature-0.8 samples.
"""

from __future__ import annotations

import argparse
import json
import time

from quill.tokenizer import Tokenizer
from quill.train.data import split_text
from quill.train.evaluate import sample, text_loss
from quill.weights import load_model


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m quill.train.card")
    p.add_argument("model")
    p.add_argument("text")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--prompt", default="ROMEO:\n")
    p.add_argument("--tokens", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-loss", action="store_true", help="also compute the (slower) training-split loss")
    args = p.parse_args(argv)
    model, tok = load_model(args.model), Tokenizer.load(args.model)
    train_text, val_text = split_text(open(args.text, encoding="utf-8").read(), args.val_fraction)
    t = time.perf_counter()
    out = {"val_loss": round(text_loss(model, tok, val_text), 4), "val_tokens": len(tok.encode(val_text)),
           "params": model.config.num_params()}
    if args.train_loss:
        out["train_loss"] = round(text_loss(model, tok, train_text), 4)
    out["eval_seconds"] = round(time.perf_counter() - t, 1)
    out["prompt"] = args.prompt
    out["greedy"] = sample(model, tok, args.prompt, args.tokens, temperature=0.0)
    out["sampled_t0.8"] = sample(model, tok, args.prompt, args.tokens, temperature=0.8, seed=args.seed)
    print(json.dumps(out, indent=2, ensure_ascii=False))


if __name__ == "__main__":
    main()
