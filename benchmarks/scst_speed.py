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

Then the two fixes for the samples' ragged lengths, each against the plain form on the same batches of real
samples (--rounds interleaved rounds, each variant's best kept), fp32:
- drawing: captions that have said <end> leave the decoder's batch (captioner.model.search), against every
  row running until the longest caption ends;
- the policy-gradient pass (forward, backward): the recurrence packed to each sample's own length
  (CaptionDecoder.forward's `lengths`), against running every row to the longest sample's length.
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
from captioner.model.output import Targets
from captioner.model.search import captioning_policy, draw, sample
from captioner.precision import FP32, resolve
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
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the ragged-length comparison")
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
    ragged_lengths(store.array, data, vocab, tc, args.rounds)


def plain_sample(model, features, generator, max_len, start_id, end_id):
    """Sampling without the fix: every row runs every step until the longest caption has ended."""
    state = model.init_state(features)
    tokens = torch.full((features.shape[0],), start_id)
    out, ended = [], torch.zeros(features.shape[0], dtype=torch.bool)
    for t in range(max_len):
        log_probs, state = model.step(tokens, state)
        if t == 0:
            log_probs[:, end_id] = float("-inf")
        tokens = draw(torch.softmax(log_probs, -1), generator)
        out.append(tokens)
        ended |= tokens == end_id
        if ended.all():
            break
    rows = torch.stack(out, 1).tolist()
    return [r[:r.index(end_id)] if end_id in r else r for r in rows]


def ragged_lengths(features, data, vocab, tc, rounds: int) -> None:
    """Each fix for the ragged samples against its plain form, on the same batches (see the docstring)."""
    model = checkpoint.load_model(default_checkpoint()).model.eval()
    policy = captioning_policy(model, vocab)
    K, max_len = tc.scst_samples, tc.eval_max_len
    batches = [np.arange(i, min(len(data), i + tc.scst_batch_size)) for i in range(0, len(data), tc.scst_batch_size)]
    feats = [torch.from_numpy(np.asarray(features[data.rows[b]], dtype=np.float32)).repeat_interleave(K, 0)
             for b in batches]
    kw = dict(max_len=max_len, start_id=vocab.start_id, end_id=vocab.end_id)
    with torch.no_grad():
        drawn = [sample(policy, f, generator=torch.Generator().manual_seed(i), **kw) for i, f in enumerate(feats)]
    tensors = [scst.sequence_tensors(d, max_len, vocab.start_id, vocab.end_id, vocab.pad_id) for d in drawn]

    def draw_all(fn):
        with torch.no_grad():
            for i, f in enumerate(feats):
                fn(policy, f, generator=torch.Generator().manual_seed(i), **kw)

    def gradient_all(packed: bool):
        for f, (inputs, targets) in zip(feats, tensors):
            mask = targets != vocab.pad_id
            model.zero_grad(set_to_none=True)
            weights = torch.randn(int(mask.sum()), generator=torch.Generator().manual_seed(0)) / mask.sum()
            loss = model(f, inputs, mask, Targets(targets[mask], weights, suppressed=policy.word_ids),
                         lengths=mask.sum(1) if packed else None)
            loss.backward()

    variants = {"draw, ended rows leave": lambda: draw_all(sample),
                "draw, every row runs": lambda: draw_all(plain_sample),
                "gradient, packed": lambda: gradient_all(True),
                "gradient, padded": lambda: gradient_all(False)}
    best = dict.fromkeys(variants, float("inf"))
    with FP32.autocast():
        for _ in range(rounds):
            for name, fn in variants.items():
                start = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - start)
    real = sum(int((t != vocab.pad_id).sum()) for _, t in tensors)
    padded = sum(t.numel() for _, t in tensors)
    print(f"ragged samples, fp32, {len(batches)} batches of {tc.scst_batch_size * K} samples: "
          f"{real} real tokens in {padded} padded positions ({100 * real / padded:.0f}%); best of {rounds} rounds")
    for fix, plain in (("draw, ended rows leave", "draw, every row runs"), ("gradient, packed", "gradient, padded")):
        print(f"  {fix:<26}{best[fix]:>8.2f} s   {plain:<24}{best[plain]:>8.2f} s   "
              f"{best[plain] / best[fix]:.2f}x faster")


if __name__ == "__main__":
    main()
