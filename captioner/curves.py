"""Training curves: train/val loss, val BLEU-4 and CIDEr per epoch, drawn from a run's log.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

from captioner.atomic import atomic_write


def plot_curves(log_path: Path, out_path: Path) -> Path:
    """Write a PNG with three panels (loss, BLEU-4, CIDEr) against the epoch."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    entries = [json.loads(line) for line in Path(log_path).read_text(encoding="utf-8").splitlines() if line]
    epochs = [e["epoch"] for e in entries]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    axes[0].plot(epochs, [e["train_loss"] for e in entries], "o-", label="train")
    axes[0].plot(epochs, [e.get("val_loss") for e in entries], "o-", label="val")
    axes[0].set_title("cross-entropy per token")
    axes[0].legend()
    for ax, key in zip(axes[1:], ["BLEU-4", "CIDEr"]):
        ax.plot(epochs, [e.get(f"val_{key}") for e in entries], "o-", color="tab:green")
        ax.set_title(f"val {key} (greedy)")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(out_path, lambda f: fig.savefig(f, dpi=80, format="png"))  # a kill never leaves half a PNG
    plt.close(fig)
    return Path(out_path)
