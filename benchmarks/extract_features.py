"""How fast is feature extraction, and is JPEG decoding or the CNN the bottleneck? fp32 and bf16 side by side.

    python benchmarks/extract_features.py --data /work/shared/datasets/flickr8k --batch-size 64 --workers 2
                                          [--precisions fp32,bf16] [--limit N] [--sweep]

Per precision:
1. extract the Flickr8k train split (Flickr_8k.trainImages.txt; its first --limit images) into a fresh
   temporary cache: images/s
2. the bare forward pass on random (B, 3, 224, 224) tensors at the same batch size, in that precision:
   images/s -- the bound extraction is measured against
3. their ratio ("% of bound"): near 100% means the CNN is the bottleneck, well below means decoding and
   preprocessing (or their contention with the CNN for the cores) is
4. the second, cached run over the same images: seconds
--sweep: fp32 extraction of the same images for several DataLoader workers x torch threads settings, and
how many images JPEG draft mode could decode at reduced size (only those at least twice the resize).
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from captioner.vision.encoders import build_encoder  # noqa: E402
from captioner.errors import CaptionerError  # noqa: E402
from captioner.precision import resolve  # noqa: E402
from captioner.vision.features import extract_features  # noqa: E402
from captioner.vision.images import load_image  # noqa: E402


def forward_images_per_second(encoder, batch_size: int, batches: int, precision) -> float:
    size = encoder.spec.image_size
    x = torch.randn(batch_size, 3, size, size)  # (B, 3, H, W), already "preprocessed"
    with torch.inference_mode(), precision.autocast():
        encoder(x)  # warm-up: first call allocates
        start = time.perf_counter()
        for _ in range(batches):
            encoder(x)
        return batch_size * batches / (time.perf_counter() - start)


def extraction_rate(encoder, paths, batch_size, workers, precision) -> tuple[float, float, int]:
    with tempfile.TemporaryDirectory() as cache:
        start = time.perf_counter()
        store = extract_features(encoder, paths, Path(cache), batch_size, workers, progress=False,
                                 precision=precision)
        seconds = time.perf_counter() - start
        cached_start = time.perf_counter()
        extract_features(encoder, paths, Path(cache), batch_size, workers, progress=False, precision=precision)
        return len(paths) / seconds, time.perf_counter() - cached_start, len(store.failures)


def sweep(encoder, paths, batch_size) -> None:
    print("\nfp32 extraction, DataLoader workers x torch threads:")
    fp32 = resolve("fp32", "cpu")
    threads = torch.get_num_threads()
    for workers, n_threads in [(0, threads), (1, threads), (2, threads), (1, max(1, threads - 1)),
                               (2, max(1, threads - 1))]:
        torch.set_num_threads(n_threads)
        rate, _, _ = extraction_rate(encoder, paths, batch_size, workers, fp32)
        print(f"  workers {workers}, threads {n_threads}: {rate:.1f} images/s")
    torch.set_num_threads(threads)
    start = time.perf_counter()
    for p in paths:
        encoder.preprocess(load_image(p))
    per_image = (time.perf_counter() - start) / len(paths)
    resize = encoder.spec.resize
    draftable = 0
    for p in paths:
        with Image.open(p) as img:
            draftable += img.format == "JPEG" and min(img.size) >= 2 * resize
    print(f"decode + preprocess alone: {1000 * per_image:.1f} ms/image ({1 / per_image:.0f} images/s, one core); "
          f"JPEG draft mode applies to {draftable} of {len(paths)} images (shorter side >= {2 * resize} px)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="Flickr8k folder (Images/, split files)")
    parser.add_argument("--encoder", default="efficientnet_lite0")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--forward-batches", type=int, default=5)
    parser.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16")
    parser.add_argument("--limit", type=int, default=0, help="only the split's first N images (0: all)")
    parser.add_argument("--sweep", action="store_true", help="also try workers x threads settings (fp32)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")

    split = args.data / "Flickr_8k.trainImages.txt"
    if not split.is_file():
        raise CaptionerError(f"{split}: split file not found")
    paths = [args.data / "Images" / line.strip() for line in split.read_text().splitlines() if line.strip()]
    paths = paths[: args.limit or None]
    encoder = build_encoder(args.encoder)
    print(f"{len(paths)} train images, encoder {args.encoder}, batch {args.batch_size}, "
          f"{args.workers} workers, {torch.get_num_threads()} torch threads")
    print(f"{'prec':<6}{'extraction img/s':>18}{'forward img/s':>15}{'% of bound':>12}{'cached run s':>14}"
          f"{'bf16/fp32':>11}")
    rates = {}
    for name in args.precisions.split(","):
        precision = resolve(name, "cpu")
        logging.getLogger("captioner").info(precision.describe())
        rate, cached_s, failed = extraction_rate(encoder, paths, args.batch_size, args.workers, precision)
        forward = forward_images_per_second(encoder, args.batch_size, args.forward_batches, precision)
        rates[name] = rate
        ratio = f"{rate / rates['fp32']:>10.2f}x" if name == "bf16" and "fp32" in rates else ""
        print(f"{name:<6}{rate:>18.1f}{forward:>15.1f}{100 * rate / forward:>11.0f}%{cached_s:>14.2f}{ratio}"
              + (f"  ({failed} failed)" if failed else ""), flush=True)
    if args.sweep:
        sweep(encoder, paths, args.batch_size)


if __name__ == "__main__":
    try:
        main()
    except CaptionerError as e:
        sys.exit(f"error: {e}")
