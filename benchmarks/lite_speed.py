"""Feature-extraction speed of EfficientNet-Lite0/1/2 side by side, in one process (fp32).

    python benchmarks/lite_speed.py --data /work/shared/datasets/flickr8k --images 200

For each encoder: the full extraction (decode, resize, crop, CNN) of the first N Flickr8k train images into
a fresh temporary cache, in images/s, and the bare forward pass on a random batch. The encoders take turns
over --rounds rounds and the best round counts, so load from other users of the machine hits all alike;
the ratios to Lite0 are the figures to trust on a shared machine. Also prints what extracting all 7091
Flickr8k images (train + dev + test) would take at that rate.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from captioner.vision.encoders import build_encoder  # noqa: E402
from captioner.vision.features import extract_features  # noqa: E402

NAMES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2")


def forward_rate(encoder, batch_size: int) -> float:
    x = torch.randn(batch_size, 3, encoder.spec.image_size, encoder.spec.image_size)
    with torch.inference_mode():
        encoder(x)  # warm-up
        start = time.perf_counter()
        encoder(x)
        return batch_size / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    split = args.data / "Flickr_8k.trainImages.txt"
    paths = [args.data / "Images" / n.strip() for n in split.read_text().splitlines() if n.strip()][:args.images]
    encoders = {name: build_encoder(name) for name in NAMES}
    print(f"{len(paths)} images, batch {args.batch_size}, {args.workers} workers, "
          f"{torch.get_num_threads()} torch threads, fp32")
    extract = {name: 0.0 for name in NAMES}
    forward = {name: 0.0 for name in NAMES}
    for _ in range(args.rounds):
        for name, encoder in encoders.items():
            with tempfile.TemporaryDirectory() as cache:
                start = time.perf_counter()
                extract_features(encoder, paths, Path(cache), args.batch_size, args.workers, progress=False)
                extract[name] = max(extract[name], len(paths) / (time.perf_counter() - start))
            forward[name] = max(forward[name], forward_rate(encoder, args.batch_size))
    print(f"{'encoder':20s} {'extract img/s':>14s} {'vs lite0':>9s} {'forward img/s':>14s} {'vs lite0':>9s} "
          f"{'7091 images':>12s}")
    for name in NAMES:
        print(f"{name:20s} {extract[name]:14.1f} {extract[name] / extract[NAMES[0]]:9.2f} "
              f"{forward[name]:14.1f} {forward[name] / forward[NAMES[0]]:9.2f} {7091 / extract[name] / 60:9.1f} min")


if __name__ == "__main__":
    main()
