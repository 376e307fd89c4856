"""Look inside the decoder: gradient flow through time, and units that track properties of the words: the same as `captioner analyze` (`python analyze.py --help` lists the options)."""

import sys

from captioner.cli import main

if __name__ == "__main__":
    main(["analyze", *sys.argv[1:]], entry=True)
