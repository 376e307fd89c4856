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

Then three ways to take an SCST step's samples and policy gradient, on the same batches of the shipped
model's samples (same generator seeds, so the same captions), fp32, --rounds interleaved rounds with each
way's best kept:
- plain: every row runs until the longest caption has ended, then a teacher-forced pass over the samples
  padded to the longest one (forward, backward);
- ragged: captions that have said <end> leave the decoder's batch (captioner.model.search), and the
  teacher-forced pass runs packed, each sample for its own length (CaptionDecoder.forward's `lengths`);
- one pass (what training runs): the draw keeps its forward pass, and the gradient is applied from it
  with no second forward (captioner.train.scst.Recorded).
"""

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from captioner import allocator, checkpoint
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
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the comparison of ways to take an SCST step")
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
    allocator.print_line()
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
    step_variants(store.array, data, vocab, tc, args.rounds)


def plain_sample(model, features, generator, max_len, start_id, end_id):
    """Sampling as it was: every row runs every step until the longest caption has ended."""
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


def step_variants(features, data, vocab, tc, rounds: int) -> None:
    """The three ways of the docstring, each over every batch; best of `rounds` interleaved rounds."""
    model = checkpoint.load_model(default_checkpoint()).model.eval()
    policy = captioning_policy(model, vocab)
    K, max_len, ids = tc.scst_samples, tc.eval_max_len, (vocab.start_id, vocab.end_id)
    batches = [np.arange(i, min(len(data), i + tc.scst_batch_size)) for i in range(0, len(data), tc.scst_batch_size)]
    feats = [torch.from_numpy(np.asarray(features[data.rows[b]], dtype=np.float32)).repeat_interleave(K, 0)
             for b in batches]
    advantages = [torch.randn(len(f), generator=torch.Generator().manual_seed(i)) for i, f in enumerate(feats)]

    def teacher_forced(f, drawn, advantage, packed: bool) -> None:
        inputs, targets = scst.sequence_tensors(drawn, max_len, *ids, vocab.pad_id)
        mask = targets != vocab.pad_id
        weights = scst.policy_weights(advantage[:, None].expand_as(mask)[mask], targets[mask] == vocab.end_id)
        loss = model(f, inputs, mask, Targets(targets[mask], weights, suppressed=policy.word_ids),
                     lengths=mask.sum(1) if packed else None)
        loss.backward()

    def two_pass(ragged: bool) -> tuple[float, float, int, int]:
        drawing = gradient = 0.0
        real = padded = 0
        for i, (f, adv) in enumerate(zip(feats, advantages)):
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            with torch.no_grad():
                draw_fn = sample if ragged else plain_sample
                drawn = draw_fn(policy, f, generator=torch.Generator().manual_seed(i), max_len=max_len,
                                start_id=ids[0], end_id=ids[1])
            t1 = time.perf_counter()
            teacher_forced(f, drawn, adv, packed=ragged)
            drawing, gradient = drawing + t1 - t0, gradient + time.perf_counter() - t1
            real += sum(len(c) + (len(c) < max_len) for c in drawn)
            padded += len(drawn) * (max(len(c) for c in drawn) + 1)
        return drawing, gradient, real, padded

    def one_pass() -> tuple[float, float, int, int]:
        drawing = gradient = 0.0
        for i, (f, adv) in enumerate(zip(feats, advantages)):
            model.zero_grad(set_to_none=True)
            t0 = time.perf_counter()
            recorded = scst.draw_recorded(model, f, policy.word_ids, max_len, torch.Generator().manual_seed(i), *ids)
            t1 = time.perf_counter()
            recorded.backward(adv, vocab.end_id)
            drawing, gradient = drawing + t1 - t0, gradient + time.perf_counter() - t1
        return drawing, gradient, 0, 0

    variants = {"plain": lambda: two_pass(False), "ragged": lambda: two_pass(True), "one pass": one_pass}
    best: dict[str, tuple] = {}
    with FP32.autocast():
        for _ in range(rounds):
            for name, fn in variants.items():
                result = fn()
                if name not in best or sum(result[:2]) < sum(best[name][:2]):
                    best[name] = result
    _, _, real, padded = best["plain"]
    print(f"an SCST step's samples and gradient, fp32, {len(batches)} batches of {tc.scst_batch_size * K} samples: "
          f"{real} sampled tokens in {padded} padded positions ({100 * real / padded:.0f}%); best of {rounds} rounds")
    print(f"{'way':<10}{'draw s':>8}{'gradient s':>12}{'total s':>9}{'vs plain':>10}")
    plain_total = sum(best["plain"][:2])
    for name, (drawing, gradient, _, _) in best.items():
        print(f"{name:<10}{drawing:>8.2f}{gradient:>12.2f}{drawing + gradient:>9.2f}"
              f"{plain_total / (drawing + gradient):>9.2f}x")


if __name__ == "__main__":
    main()
