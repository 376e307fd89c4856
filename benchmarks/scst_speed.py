"""Where a self-critical epoch's time goes, against a cross-entropy epoch over the same images.

    python3 benchmarks/scst_speed.py --data ../shared/datasets/flickr8k [--images 500] [--precisions fp32,bf16]
                                     [--cache cache] [--threads 2]

The shipped model (so the samples are real captions of real lengths) trains one SCST epoch with the
shipped recipe's settings (5 samples per image, the mean baseline, 50 images a batch) on the first
--images training images, and one cross-entropy epoch over the same images' captions. The SCST epoch is
split into its parts (captioner.train.scst.PARTS): drawing the samples, their CIDEr-D rewards, the
baseline, and the policy-gradient pass. Features are extracted once into --cache (fp32) and reused.
CIDEr-D's document frequencies come from these images alone, which changes the rewards' values but not
their cost. All figures come from one run; compare the ratios.
"""

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from captioner import checkpoint
from captioner.config import load_config
from captioner.data.dataset import BucketBatchSampler, CaptionDataset, Collate
from captioner.data.records import load_records
from captioner.inference import default_checkpoint
from captioner.precision import resolve
from captioner.train import scst
from captioner.train.step import train_one_epoch
from captioner.vision.encoders import build_encoder
from captioner.vision.features import extract_features


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="a Flickr8k folder")
    p.add_argument("--images", type=int, default=500)
    p.add_argument("--cache", default="cache")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    shipped = checkpoint.load_model(default_checkpoint())
    cfg = load_config("flickr8k")  # the shipped recipe
    tc = cfg.train
    train = [r for r in load_records(args.data) if r.split == "train"][:args.images]
    spec = shipped.encoder_spec()
    encoder = build_encoder(spec.name, flip_average=spec.flip_average, pooling=spec.pooling)
    store = extract_features(encoder, [r.image for r in train], Path(args.cache), progress=False)
    train = [r for r in train if r.image in store]
    rows = store.rows([r.image for r in train])
    vocab = shipped.vocab
    data = scst.RewardData([r.image for r in train], rows, [list(r.captions) for r in train])
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {len(train)} images; SCST: "
          f"{tc.scst_samples} samples/image, baseline {tc.scst_baseline}, {tc.scst_batch_size} images/batch")
    header = f"{'precision':<10}{'XE epoch s':>11}{'SCST epoch s':>13}{'SCST/XE':>9}" + "".join(
        f"{part + ' s':>12}" for part in scst.PARTS)
    lines = []
    for name in args.precisions.split(","):
        precision = resolve(name, "cpu")
        print(precision.describe())
        model = checkpoint.load_model(default_checkpoint()).model
        dataset = CaptionDataset(train, vocab, rows, cfg.data.max_len)
        sampler = BucketBatchSampler(dataset.lengths, tc.batch_size, torch.Generator().manual_seed(0))
        loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=Collate(dataset, store.array, vocab.pad_id))
        optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr)
        start = time.perf_counter()
        train_one_epoch(model, loader, optimizer, tc, tc.warmup_steps, 10 * len(loader), torch.device("cpu"),
                        vocab.pad_id, precision=precision)
        xe = time.perf_counter() - start
        optimizer = torch.optim.AdamW(model.parameters(), lr=tc.scst_lr)
        start = time.perf_counter()
        result = scst.scst_epoch(model, store.array, data, vocab, optimizer, tc, 0, torch.device("cpu"),
                                 torch.Generator().manual_seed(0), precision=precision, progress=False)
        total = time.perf_counter() - start
        parts = "".join(f"{result.seconds[part]:>7.1f} {100 * result.seconds[part] / total:>3.0f}%"
                        for part in scst.PARTS)
        lines.append(f"{precision.name:<10}{xe:>11.1f}{total:>13.1f}{total / xe:>8.2f}x{parts}")
    print(header)
    print("\n".join(lines))
    print(f"(mean sampled caption reward of the last run: {np.float64(result.sample_reward):.3f})")


if __name__ == "__main__":
    main()
