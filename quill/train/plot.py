"""The loss curve as a PNG (matplotlib's Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_losses(history: dict[str, Any], path: str | Path, title: str | None = None) -> None:
    """Per-step training loss (light), its moving average, and the periodic train/val evaluations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    steps = [r["iter"] for r in history.get("train", [])]
    losses = [r["loss"] for r in history.get("train", [])]
    if steps:
        ax.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=0.6, label="train (per step)")
        w = max(1, len(losses) // 40)  # centred moving average: no lag, w steps wide
        if w > 1:
            import numpy as np

            smooth = np.convolve(losses, np.ones(w) / w, mode="valid")
            ax.plot(steps[(w - 1) // 2:(w - 1) // 2 + len(smooth)], smooth, color="tab:blue", linewidth=1.2,
                    label=f"train ({w}-step average)")
    evals = history.get("eval", [])
    if evals:
        ax.plot([r["iter"] for r in evals], [r["train_loss"] for r in evals], "o-", color="tab:green",
                markersize=3, label="train (eval)")
        ax.plot([r["iter"] for r in evals], [r["val_loss"] for r in evals], "o-", color="tab:red", markersize=3,
                label="validation (eval)")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


__all__ = ["plot_losses"]
