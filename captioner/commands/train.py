"""`captioner train`: a config (by name or path) plus overrides, trained into a run directory.

The arguments are checked first (the config, the model to start from, the dataset folder), then the run
directory is locked for the life of the run (captioner.train.run_dir.RunLock), and only then is what it
already holds looked at: a run there is continued with --resume, or removed with --overwrite (its own files
only). The last line names the best checkpoint and the command that captions with it.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shlex
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

from captioner.config import Config, config_name, load_config
from captioner.data import records
from captioner.errors import CaptionerError
from captioner.train import run_dir as runs
from captioner.train.ensemble import fit_ensemble, is_ensemble_run
from captioner.train.init_from import init_config
from captioner.train.loop import fit

log = logging.getLogger("captioner")


def run(args: argparse.Namespace) -> int:
    if args.resume:
        if args.config or args.data or args.set or args.init_from or getattr(args, "overwrite", False):
            raise CaptionerError("--resume takes the run's own config; drop --config/--data/--set/--init-from"
                                 "/--overwrite")
        run_dir = Path(args.resume)
        if not run_dir.is_dir():
            raise CaptionerError(f"{run_dir}: nothing to resume (no such folder)")
        with _held(run_dir):
            ensemble = is_ensemble_run(run_dir)
            (fit_ensemble if ensemble else fit)(None, run_dir, resume=True)
        _say_what_next(run_dir, ensemble)
        return 0
    overrides = list(args.set) + ([f"data.root={args.data}"] if args.data else [])
    cfg = load_config(args.config, overrides)
    init_from = args.init_from or cfg.train.init_from
    if init_from:  # the architecture, weights and vocabulary come from that model
        cfg = init_config(args.config, overrides, init_from)
    _check_data(cfg)
    # The run directory stores absolute paths, so `--resume` works from any folder.
    data = cfg.data
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(
        data, root=str(Path(data.root).resolve()) if data.root else "", cache_dir=str(Path(data.cache_dir).resolve())))
    run_dir = Path(args.run_dir or Path("runs") / (config_name(args.config) if args.config else "default"))
    ensemble = cfg.ensemble.members > 1
    with _held(run_dir):
        if _is_main():  # under torchrun, rank 0 alone looks at (and clears) what the run directory holds
            _make_room(run_dir, getattr(args, "overwrite", False))
        (fit_ensemble if ensemble else fit)(cfg, run_dir)
    _say_what_next(run_dir, ensemble)
    return 0


def _is_main() -> bool:
    """Rank 0 under torchrun (RANK is set before the process group exists), or a plain process."""
    return int(os.environ.get("RANK", "0")) == 0


def _held(run_dir: Path) -> AbstractContextManager:
    """The run directory's lock; under torchrun, rank 0 holds it for every process of the run."""
    return runs.RunLock(run_dir) if _is_main() else nullcontext()


def _check_data(cfg: Config) -> None:
    """The dataset folder, before anything about the run directory: that is the mistake to hear about."""
    if not cfg.data.root:
        raise CaptionerError("no dataset given: pass --data ROOT (or set data.root in the config)")
    if cfg.data.format == "auto":
        records.detect_format(cfg.data.root)  # a missing folder, a file, a folder with no dataset: one line
    elif not Path(cfg.data.root).expanduser().is_dir():
        raise CaptionerError(f"{cfg.data.root}: dataset folder does not exist")


def _make_room(run_dir: Path, overwrite: bool) -> None:
    """Refuse a run directory that holds a run (or, with --overwrite, remove that run's files)."""
    files = runs.run_files(run_dir)
    if not files:
        return
    names = ", ".join(sorted({p.name for p in files}, key=runs.RUN_FILES.index))
    members = len(runs.members(run_dir))
    what = f"{names}" + (f", and {members} members' folders" if members else "")
    if not runs.started(run_dir):
        log.info("%s holds only the config.toml of a run that never finished an epoch: starting afresh",
                 run_dir)
        runs.remove_run(run_dir)
    elif overwrite:
        runs.remove_run(run_dir)
        log.info("--overwrite: removed the run in %s (%s)", run_dir, what)
    else:
        raise CaptionerError(f"{run_dir} already holds a run ({what}); --resume {run_dir} continues it, "
                             "--overwrite deletes those files and starts afresh, or pick another --run-dir")


def _say_what_next(run_dir: Path, ensemble: bool) -> None:
    """One line: where the model is, and the command that captions with it."""
    if not _is_main():
        return
    best = run_dir if ensemble else run_dir / runs.BEST
    if not (runs.members(run_dir) if ensemble else best.is_file()):
        return
    what = f"the ensemble's members' best checkpoints in {run_dir}" if ensemble else f"best checkpoint: {best}"
    print(f"{what}; caption photos with it: captioner caption --checkpoint {shlex.quote(str(best))} PHOTO...")
