"""`captioner export SRC DST`: a training checkpoint as a small float16 model for shipping."""

from __future__ import annotations

import argparse

from captioner.checkpoint import export_all


def run(args: argparse.Namespace) -> int:
    for out in export_all(args.src, args.dst):
        print(f"{out}: {out.stat().st_size / 1e6:.1f} MB")
    return 0
