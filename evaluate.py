"""Score a captioner on a dataset split exactly as the captioning papers do (COCO caption evaluation): the same as `captioner evaluate` (`python evaluate.py --help` lists the options)."""

import sys

from captioner.cli import main

if __name__ == "__main__":
    main(["evaluate", *sys.argv[1:]], entry=True)
