"""The names inside a run directory, in one place: what `captioner train` writes and what the commands that
read a run (caption, evaluate, export, curves) look for.

    RUN_DIR/config.toml, log.jsonl, curves.png, best.pt, last.pt     a single model's run
    RUN_DIR/member-1/, member-2/, ...                                an ensemble's members, each a run of its own

Nothing here touches the disk beyond listing a folder, and nothing imports torch.
"""

from __future__ import annotations

from pathlib import Path

LAST, BEST, CONFIG = "last.pt", "best.pt", "config.toml"
MEMBER_PREFIX = "member-"  # an ensemble's member i trains in RUN_DIR/member-i/


def member_dir(run_dir: str | Path, i: int) -> Path:
    """Where member i (from 1) of an ensemble run trains."""
    return Path(run_dir) / f"{MEMBER_PREFIX}{i}"


def member_dirs(run_dir: str | Path) -> list[Path]:
    """The folders named member-<i> in `run_dir`, in member order (1, 2, ..., 10); [] when there are none."""
    found = (d for d in Path(run_dir).glob(f"{MEMBER_PREFIX}*")
             if d.name[len(MEMBER_PREFIX):].isdigit() and d.is_dir())
    return sorted(found, key=lambda d: int(d.name[len(MEMBER_PREFIX):]))
