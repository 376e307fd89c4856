"""Which input size and preprocessing suits each EfficientNet-Lite on our photos? An ImageNet probe.

    python benchmarks/lite_preprocessing.py --data /work/shared/datasets/flickr8k --photos 64

Takes the first N Flickr8k train/dev photos whose five captions all say "dog" (and mention no people), and
for every encoder and preprocessing prints the mean top-1 probability, the mean probability on the 118 dog
classes and the share with a dog breed in the top 5. Variants: crop 224 of resize 256 (the Lite0 rule),
the native crop (Lite1 240 of 272, Lite2 260 of 292: the TF reference's crop fraction), and the 224x224
Flickr8k copies fed whole at the native size (one upsampling, no crop).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from captioner.vision.encoders import build_encoder, lite_spec  # noqa: E402
from captioner.vision.encoders.lite import LITE0, LITE1, LITE2  # noqa: E402
from captioner.vision.encoders.registry import pil_transform  # noqa: E402
from captioner.vision.images import load_image  # noqa: E402

DOG_CLASSES = torch.arange(151, 269)
PEOPLE = re.compile(r"\b(man|men|woman|women|boy|girl|child|children|kid|kids|person|people|lady|guy|cat|"
                    r"baby|player|owner|someone|horse|sheep|cow)s?\b")


def dog_photos(root: Path, n: int) -> list[Path]:
    names = set()
    for split in ("Flickr_8k.trainImages.txt", "Flickr_8k.devImages.txt"):
        names |= {line.strip() for line in (root / split).read_text().splitlines() if line.strip()}
    captions: dict[str, list[str]] = {}
    for line in (root / "Flickr8k.token.txt").read_text().splitlines():
        key, _, text = line.partition("\t")
        captions.setdefault(key.split("#")[0], []).append(text.lower())
    chosen = [name for name, caps in sorted(captions.items()) if name in names and len(caps) == 5
              and all(re.search(r"\bdog\b", c) for c in caps) and not any(PEOPLE.search(c) for c in caps)]
    return [root / "Images" / name for name in chosen[:n]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--photos", type=int, default=64)
    args = parser.parse_args()
    paths = dog_photos(args.data, args.photos)
    images = [load_image(p) for p in paths]
    print(f"{len(paths)} dog photos; {torch.get_num_threads()} torch threads")
    print(f"{'encoder':20s} {'preprocessing':34s} {'top-1':>6s} {'on dogs':>8s} {'dog in top-5':>13s}")
    for variant in (LITE0, LITE1, LITE2):
        encoder = build_encoder(variant.name)
        sizes = [(224, 256, "crop 224 of 256")]
        if variant.native_size != 224:
            n = variant.native_size
            sizes += [(n, n + 32, f"crop {n} of {n + 32} (native)"), (n, n, f"whole at {n} (native)")]
        for size, resize, label in sizes:
            transform = pil_transform(lite_spec(variant, size, resize))
            with torch.inference_mode():
                probs = encoder.classify(torch.stack([transform(im) for im in images])).softmax(-1)
            top5 = torch.isin(probs.topk(5).indices, DOG_CLASSES).any(-1).float().mean()
            print(f"{variant.name:20s} {label:34s} {probs.max(-1).values.mean():6.3f} "
                  f"{probs[:, DOG_CLASSES].sum(-1).mean():8.3f} {top5:12.0%}", flush=True)


if __name__ == "__main__":
    main()
