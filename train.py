"""Train a captioner from cached image features.

    python train.py --config configs/flickr8k.toml --data PATH [--set model.cell=gru ...] [--run-dir DIR]
    python train.py --resume RUN_DIR
"""

import argparse
from pathlib import Path

from captioner.cli import run_main, setup_logging
from captioner.config import load_config
from captioner.training import fit


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="TOML file in configs/ (defaults apply to what it leaves out)")
    parser.add_argument("--data", help="dataset root (sets data.root); the layout is detected")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value; repeatable")
    parser.add_argument("--run-dir", help="where the config, log and checkpoints go "
                                          "(default runs/<config name>)")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    setup_logging(args.verbose)

    if args.resume:
        if args.config or args.data or args.set:
            parser.error("--resume takes the run's own config; drop --config/--data/--set")
        fit(None, Path(args.resume), resume=True)
        return 0
    overrides = list(args.set) + ([f"data.root={args.data}"] if args.data else [])
    cfg = load_config(args.config, overrides)
    run_dir = Path(args.run_dir or Path("runs") / (Path(args.config).stem if args.config else "default"))
    fit(cfg, run_dir)
    return 0


if __name__ == "__main__":
    run_main(main)
