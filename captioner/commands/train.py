"""`captioner train`: a config (by name or path) plus overrides, trained into a run directory."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from captioner.config import config_name, load_config
from captioner.errors import CaptionerError
from captioner.train.ensemble import fit_ensemble, is_ensemble_run
from captioner.train.init_from import init_config
from captioner.train.loop import fit


def run(args: argparse.Namespace) -> int:
    if args.resume:
        if args.config or args.data or args.set or args.init_from:
            raise CaptionerError("--resume takes the run's own config; drop --config/--data/--set/--init-from")
        run_dir = Path(args.resume)
        (fit_ensemble if is_ensemble_run(run_dir) else fit)(None, run_dir, resume=True)
        return 0
    overrides = list(args.set) + ([f"data.root={args.data}"] if args.data else [])
    cfg = load_config(args.config, overrides)
    init_from = args.init_from or cfg.train.init_from
    if init_from:  # the architecture, weights and vocabulary come from that model
        cfg = init_config(args.config, overrides, init_from)
    # The run directory stores absolute paths, so `--resume` works from any folder.
    data = cfg.data
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(
        data, root=str(Path(data.root).resolve()) if data.root else "", cache_dir=str(Path(data.cache_dir).resolve())))
    run_dir = Path(args.run_dir or Path("runs") / (config_name(args.config) if args.config else "default"))
    (fit_ensemble if cfg.ensemble.members > 1 else fit)(cfg, run_dir)
    return 0
