"""The run directory: config.toml, log.jsonl, curves.png and the best and last checkpoints.

A `captioner train` run holds the directory's lock (`RunLock`, a file lock on RUN/.train.lock) from start to
end, so a second run into the same directory stops with one line naming the first (its pid, host and start
time, from RUN/.train.lock.json) instead of both writing into it. The lock is the operating system's
(flock): a killed run releases it, and `--resume` takes it again.

`run_files` lists what a run wrote (in the directory and in an ensemble's member-i/ folders), and
`remove_run` deletes exactly those files for `--overwrite`, never anything else the folder holds.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from captioner import checkpoint
from captioner.analysis.curves import plot_curves
from captioner.atomic import atomic_write_text, remove_stale_temps
from captioner.data.holdout import FILE_NAME as HOLDOUT_FILE
from captioner.errors import CaptionerError
from captioner.run_layout import BEST, CONFIG, LAST, member_dirs

log = logging.getLogger("captioner")

ENSEMBLE_REPORT = "ensemble.json"  # captioner.train.ensemble.REPORT
# Every file a run writes into its directory, config.toml first.
RUN_FILES = (CONFIG, "log.jsonl", "curves.png", BEST, LAST, HOLDOUT_FILE, ENSEMBLE_REPORT)
LOCK_FILE, HOLDER_FILE = ".train.lock", ".train.lock.json"


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


class RunLock:
    """`with RunLock(run_dir):` holds the run directory for one training run (made if missing).

    A second holder is refused at once with a CaptionerError naming the first: its pid, host, start time
    and command."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self._lock = FileLock(str(self.run_dir / LOCK_FILE), timeout=0)

    def __enter__(self) -> RunLock:
        if self.run_dir.exists() and not self.run_dir.is_dir():
            raise CaptionerError(f"{self.run_dir}: is a file, not a run directory")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire()
        except Timeout:
            raise CaptionerError(f"{self.run_dir}: another training run is using it ({holder(self.run_dir)}); "
                                 "wait for it to end, or train into another --run-dir") from None
        try:
            atomic_write_text(self.run_dir / HOLDER_FILE, json.dumps({
                "pid": os.getpid(), "host": socket.gethostname(),
                "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": _command()}) + "\n")
        except BaseException:
            self._lock.release()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        (self.run_dir / HOLDER_FILE).unlink(missing_ok=True)
        self._lock.release()


def holder(run_dir: Path) -> str:
    """Who holds `run_dir`'s lock, in words, as its holder file says."""
    try:
        info = json.loads((Path(run_dir) / HOLDER_FILE).read_text(encoding="utf-8"))
        return (f"pid {info['pid']} on {info['host']}, started {info['started']}: "
                f"{info.get('command') or 'captioner train'}")
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has not said who it is yet"


def _command() -> str:
    return " ".join(["captioner", *sys.argv[1:]]) if sys.argv else "captioner train"


def members(run_dir: Path) -> list[Path]:
    """An ensemble run's member-i/ folders that are run directories of their own."""
    return [d for d in member_dirs(run_dir) if (d / CONFIG).is_file()]


def run_files(run_dir: Path) -> list[Path]:
    """The files a run wrote in `run_dir` (and in its members' folders); [] where it is not a run directory
    (no config.toml), whatever else it holds."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG).is_file():
        return []
    found = [run_dir / name for name in RUN_FILES if (run_dir / name).is_file()]
    for member in members(run_dir):
        found += run_files(member)
    return found


def started(run_dir: Path) -> bool:
    """Whether a run in `run_dir` finished an epoch (anything beyond its config.toml)."""
    return any(p.name != CONFIG for p in run_files(run_dir))


def remove_run(run_dir: Path) -> list[Path]:
    """Delete the files `run_files` lists (and the members' folders, once empty); -> what was deleted.
    Anything else in the folders (a user's notes, an evaluate --json file) stays."""
    removed = run_files(run_dir)
    for path in removed:
        path.unlink()
        remove_stale_temps(path)
    for member in member_dirs(run_dir):
        try:
            member.rmdir()
        except OSError:  # holds something the run did not write: kept
            pass
    return removed
