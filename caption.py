"""Caption images from the command line: the same as `captioner caption` (`python caption.py --help` lists the options)."""

import sys

from captioner.cli import main

if __name__ == "__main__":
    main(["caption", *sys.argv[1:]], entry=True)
