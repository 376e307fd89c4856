"""Build the neighbour index of a dataset's training images for a model (default: the shipped one).

    python3 benchmarks/build_neighbours.py --data ../shared/datasets/flickr8k --cache-dir /work/cache-e \
        [--checkpoint flickr8k] [--dims 256] [--out captioner/pretrained/neighbours.knn]

The training split's images go through the model's encoder (through the feature cache, so images cached
before cost nothing), and their unit vectors, projected on their top --dims principal directions, are
stored with their tokenized captions and the encoder's spec (captioner.model.neighbours). This is how the
shipped captioner/pretrained/neighbours.knn was made (Flickr8k train, 6,000 images); its confidence
calibration is added afterwards by benchmarks/rerank_tune.py --write-calibration. `captioner train` writes
the same index into every run directory by itself.
"""

import argparse
import sys
from pathlib import Path

from captioner.data.records import load_records
from captioner.inference import Captioner
from captioner.model.neighbours import DEFAULT_DIMS, index_of_records
from captioner.vision.features import extract_features

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True)
    p.add_argument("--cache-dir", default="cache")
    p.add_argument("--checkpoint", action="append", default=[])
    p.add_argument("--dims", type=int, default=DEFAULT_DIMS)
    p.add_argument("--out", default=str(REPO / "captioner" / "pretrained" / "neighbours.knn"))
    args = p.parse_args()
    cap = Captioner.from_checkpoints(args.checkpoint)
    train = [r for r in load_records(args.data) if r.split == "train"]
    store = extract_features(cap.encoder, [r.image for r in train], Path(args.cache_dir), precision=cap.precision)
    train = [r for r in train if r.image in store]
    index = index_of_records(train, store.get([r.image for r in train]).numpy(), cap.loaded.encoder, args.dims)
    out = index.save(args.out)
    print(f"{out}: {len(index)} images, {int(index.caption_starts.shape[0]) - 1} captions, "
          f"{len(index.words)} words, {index.vectors.shape[1]} dims, {out.stat().st_size / 1e6:.1f} MB",
          file=sys.stderr)


if __name__ == "__main__":
    main()
