"""Train a captioner from cached image features: the same as `captioner train` (`python train.py --help` lists the options)."""

import sys

from captioner.cli import main

if __name__ == "__main__":
    main(["train", *sys.argv[1:]], entry=True)
