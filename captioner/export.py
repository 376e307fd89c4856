"""Turn a training checkpoint into a small shippable one: float16 weights, no optimizer state.

    python -m captioner.export runs/flickr8k/best.pt captioner/pretrained/flickr8k.pt

The exported file still rebuilds itself (model config, vocabulary, encoder spec) and records where it
came from: the resolved training config, the epoch, and the dev metrics it was selected on.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from captioner import checkpoint
from captioner.cli import run_main, setup_logging


def export(src: str | Path, dst: str | Path) -> Path:
    ckpt = checkpoint.read(src)
    loaded = checkpoint.build_model(ckpt, src)
    payload = checkpoint.model_payload(loaded.model, loaded.vocab, loaded.encoder, half=True)
    payload["provenance"] = {
        "source": Path(src).name,
        "config": ckpt.get("config"),
        "epoch": ckpt.get("epoch"),
        "step": ckpt.get("step"),
        "dev_metrics": ckpt.get("metrics"),
    }
    checkpoint.save(dst, payload)
    return Path(dst)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="a checkpoint written by train.py (best.pt or last.pt)")
    parser.add_argument("dst", help="where to write the float16 model")
    args = parser.parse_args()
    setup_logging()
    out = export(args.src, args.dst)
    print(f"{out}: {out.stat().st_size / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    run_main(main)
