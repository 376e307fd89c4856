"""A run's log.jsonl read back: training curves (loss, val BLEU-4, CIDEr per epoch) and table rows."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from captioner.atomic import atomic_write
from captioner.errors import CaptionerError
from captioner.run_layout import member_dirs

log = logging.getLogger("captioner")


def plot_curves(log_path: Path, out_path: Path) -> Path:
    """Write a PNG with three panels (loss, BLEU-4, CIDEr) against the epoch."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    entries = [json.loads(line) for line in Path(log_path).read_text(encoding="utf-8").splitlines() if line]
    epochs = [e["epoch"] for e in entries]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    xe = [e for e in entries if e.get("phase", "xe") == "xe"]  # SCST epochs' train loss is a policy loss
    axes[0].plot([e["epoch"] for e in xe], [e["train_loss"] for e in xe], "o-", label="train")
    axes[0].plot(epochs, [e.get("val_loss") for e in entries], "o-", label="val")
    axes[0].set_title("cross-entropy per token")
    for ax, key in zip(axes[1:], ["BLEU-4", "CIDEr"]):
        ax.plot(epochs, [e.get(f"val_{key}") for e in entries], "o-", color="tab:green")
        ax.set_title(f"val {key} (greedy)")
    scst_epochs = [e["epoch"] for e in entries if e.get("phase") == "scst"]
    for ax in axes:
        if scst_epochs:  # where self-critical training took over
            ax.axvline(scst_epochs[0] - 0.5, color="grey", linestyle="--", label="SCST starts")
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    atomic_write(out_path, lambda f: fig.savefig(f, dpi=80, format="png"))  # a kill never leaves half a PNG
    plt.close(fig)
    return Path(out_path)


def read_log(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "log.jsonl"
    if not path.is_file():
        raise CaptionerError(f"{run_dir}: no log.jsonl (not a run directory, or no epoch finished)")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _runs(run_dirs: list[Path]) -> list[tuple[Path, str]]:
    """(folder, name in the table) of every run among `run_dirs`: an ensemble's run directory stands for its
    members; a folder that is not a run (a config.toml alone, left by a command that failed) is skipped with
    a note."""
    runs = []
    for run_dir in map(Path, run_dirs):
        members = [d for d in member_dirs(run_dir) if _has_epochs(d)]
        if _has_epochs(run_dir):
            runs.append((run_dir, run_dir.name))
        elif members:
            runs += [(m, f"{run_dir.name}/{m.name}") for m in members]
        else:
            why = "no such folder" if not run_dir.is_dir() else "not a run directory, or no epoch finished"
            log.warning("%s: skipped (no log.jsonl: %s)", run_dir, why)
    return runs


def _has_epochs(run_dir: Path) -> bool:
    return (run_dir / "log.jsonl").is_file() and bool(read_log(run_dir))


def runs_table(run_dirs: list[Path], metric: str = "CIDEr", eval_name: str | None = None) -> str:
    """A markdown table, one row per run.

    Without `eval_name`: the epoch best by `metric` and its greedy val scores from the training log. With
    it: the totals of the evaluate.py --json file of that name in each run directory (e.g. beam search
    with METEOR), which a run without one shows as blanks. Training time sums the epochs' train_seconds.
    """
    keys = ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr"]
    if eval_name is None:
        keys.remove("METEOR")  # training logs never compute it
    rows = ["| run | epochs | best epoch | " + " | ".join(keys) + " | train time (s) |",
            "| --- | ---: | ---: | " + " | ".join("---:" for _ in keys) + " | ---: |"]
    runs = _runs(run_dirs)
    if not runs:
        raise CaptionerError(f"none of {', '.join(map(str, run_dirs))} is a run with a finished epoch "
                             "(no log.jsonl)")
    for run_dir, name in runs:
        entries = read_log(run_dir)
        best = max(entries, key=lambda e: e.get(f"val_{metric}", float("-inf")))
        seconds = sum(e["train_seconds"] for e in entries)
        if eval_name is None:
            values = {k: best.get(f"val_{k}") for k in keys}
        else:
            path = Path(run_dir) / eval_name
            totals = json.loads(path.read_text(encoding="utf-8"))["totals"] if path.is_file() else {}
            values = {k: totals.get(k) for k in keys}
        scores = " | ".join("" if values[k] is None else f"{values[k]:.1f}" for k in keys)
        rows.append(f"| {name} | {len(entries)} | {best['epoch']} | {scores} | {seconds:.0f} |")
    return "\n".join(rows)
