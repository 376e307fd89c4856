"""The run directory: config.toml, log.jsonl, curves.png and the best and last checkpoints."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from captioner import checkpoint
from captioner.analysis.curves import plot_curves
from captioner.atomic import atomic_write_text, remove_stale_temps

log = logging.getLogger("captioner")

LAST, BEST = "last.pt", "best.pt"


def write_epoch(run_dir: Path, entry: dict[str, Any], metrics: dict[str, float], improved: bool,
                 payload: dict[str, Any]) -> None:
    """Rank 0's end of an epoch: a log line, a message, the best and last checkpoints."""
    # Checkpoints first: a kill between the two leaves a log one epoch behind, which the resumed run
    # rewrites, rather than a log line for an epoch that resume will run again.
    if improved:
        checkpoint.save(run_dir / BEST, payload)
    checkpoint.save(run_dir / LAST, payload)
    for name in ("log.jsonl", "curves.png", "config.toml"):
        remove_stale_temps(run_dir / name)  # what a writer killed mid-write left behind
    lines = [line for line in read_lines(run_dir / "log.jsonl") if json.loads(line)["epoch"] < entry["epoch"]]
    atomic_write_text(run_dir / "log.jsonl", "".join(f"{line}\n" for line in lines + [json.dumps(entry)]))
    plot_curves(run_dir / "log.jsonl", run_dir / "curves.png")
    log.info("epoch %d: train loss %.4f, val loss %.4f, BLEU-4 %.2f, CIDEr %.2f (%.0fs)%s", entry["epoch"],
             entry["train_loss"], metrics["loss"], metrics.get("BLEU-4", float("nan")),
             metrics.get("CIDEr", float("nan")), entry["train_seconds"], "  * best" if improved else "")


def read_lines(path: Path) -> list[str]:
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()] if path.exists() else []
