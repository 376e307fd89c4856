"""How fast is feature extraction, and is JPEG decoding or the CNN the bottleneck?

    python benchmarks/extract_features.py --data /work/shared/datasets/flickr8k --batch-size 64 --workers 2

1. extract the Flickr8k train split (Flickr_8k.trainImages.txt) into a fresh temporary cache: images/s
2. the bare forward pass on random (B, 3, 224, 224) tensors at the same batch size: images/s
3. their ratio: near 1 means the CNN is the bottleneck, well below 1 means decoding/preprocessing is
4. the second, cached run over the same images: seconds
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
from captioner.errors import CaptionerError  # noqa: E402
from captioner.vision.features import extract_features  # noqa: E402


def forward_images_per_second(encoder, batch_size: int, batches: int) -> float:
    size = encoder.spec.image_size
    x = torch.randn(batch_size, 3, size, size)  # (B, 3, H, W), already "preprocessed"
    with torch.inference_mode():
        encoder(x)  # warm-up: first call allocates
        start = time.perf_counter()
        for _ in range(batches):
            encoder(x)
        return batch_size * batches / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="Flickr8k folder (Images/, split files)")
    parser.add_argument("--encoder", default="efficientnet_lite0")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--forward-batches", type=int, default=5)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")

    split = args.data / "Flickr_8k.trainImages.txt"
    if not split.is_file():
        raise CaptionerError(f"{split}: split file not found")
    paths = [args.data / "Images" / line.strip() for line in split.read_text().splitlines() if line.strip()]
    encoder = build_encoder(args.encoder)
    print(f"{len(paths)} train images, encoder {args.encoder}, batch {args.batch_size}, "
          f"{args.workers} workers, {torch.get_num_threads()} torch threads")

    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        store = extract_features(encoder, paths, Path(cache), args.batch_size, args.workers)
        extract_s = time.perf_counter() - start
        extract_rate = len(paths) / extract_s
        print(f"extraction: {len(store)} images in {extract_s:.1f} s = {extract_rate:.1f} images/s"
              f" ({len(store.failures)} failed)")

        forward_rate = forward_images_per_second(encoder, args.batch_size, args.forward_batches)
        print(f"bare forward: {forward_rate:.1f} images/s")
        ratio = extract_rate / forward_rate
        verdict = ("the CNN is the bottleneck" if ratio > 0.8
                   else "decoding/preprocessing (or contention with it) is the bottleneck")
        print(f"extraction / forward = {ratio:.2f}: {verdict}")

        start = time.perf_counter()
        cached = extract_features(encoder, paths, Path(cache), args.batch_size, args.workers)
        print(f"cached run: {len(cached)} images in {time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    try:
        main()
    except CaptionerError as e:
        sys.exit(f"error: {e}")
