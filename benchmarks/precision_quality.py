"""The shipped model (or --checkpoint) decoded in fp32 and in bf16 on one split, scored side by side.

    python benchmarks/precision_quality.py --data /work/shared/datasets/flickr8k --split val --beam-size 3

Each precision extracts (or reuses) its own features, as `captioner evaluate --precision` does, unless
--fp32-features: then both decode the same fp32 features, which isolates the decoder's precision (and is
far quicker where bf16 is emulated). Prints BLEU-1..4, ROUGE-L and CIDEr per precision, their
differences, how many captions differ, and the cosine similarity of the two precisions' features.
bf16 runs even where the CPU lacks native bf16 (slowly): this checks numerics, not speed.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from captioner.data.records import load_records, normalize_split  # noqa: E402
from captioner.eval.metrics import score_captions  # noqa: E402
from captioner.inference import Captioner  # noqa: E402
from captioner.precision import resolve  # noqa: E402
from captioner.vision.features import extract_features  # noqa: E402

METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--split", default="val")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--beam-size", type=int, default=3)
    p.add_argument("--limit", type=int, default=0, help="only the split's first N images (0: all)")
    p.add_argument("--cache-dir", type=Path, default=Path("/tmp/bf16-cache"))
    p.add_argument("--fp32-features", action="store_true", help="both precisions decode fp32 features")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    records = load_records(args.data, splits=[normalize_split(args.split)])[: args.limit or None]
    results, features = {}, {}
    for name in ("fp32", "bf16"):
        precision = resolve(name, "cpu")
        captioner = Captioner.from_checkpoints([args.checkpoint] if args.checkpoint else [], precision=precision)
        start = time.perf_counter()
        store = extract_features(captioner.encoder, [r.image for r in records], args.cache_dir,
                                 precision=resolve("fp32", "cpu") if args.fp32_features else precision)
        kept = [r for r in records if r.image in store]
        feats = features[name] = store.get([r.image for r in kept])
        extracted = time.perf_counter() - start
        start = time.perf_counter()
        hyps = captioner.caption_features(feats, beam_size=args.beam_size)
        decoded = time.perf_counter() - start
        captions = {str(r.image): captioner.text(h[0]) for r, h in zip(kept, hyps)}
        refs = {str(r.image): list(r.captions) for r in kept}
        results[name] = (captions, score_captions(refs, captions, meteor=False).totals)
        print(f"{name}: {len(kept)} images; features {extracted:.0f} s, beam-{args.beam_size} decoding "
              f"{decoded:.0f} s", flush=True)
    print(f"{'metric':<9}{'fp32':>9}{'bf16':>9}{'bf16-fp32':>11}")
    for m in METRICS:
        a, b = results["fp32"][1][m], results["bf16"][1][m]
        print(f"{m:<9}{a:>9.2f}{b:>9.2f}{b - a:>+11.2f}")
    cap32, cap16 = results["fp32"][0], results["bf16"][0]
    differ = sum(cap32[k] != cap16.get(k) for k in cap32)
    print(f"captions that differ: {differ} of {len(cap32)}")
    if not args.fp32_features:
        cos = torch.nn.functional.cosine_similarity(features["fp32"], features["bf16"], dim=1)
        print(f"feature cosine bf16 vs fp32: min {cos.min():.5f}, mean {cos.mean():.5f}")


if __name__ == "__main__":
    main()
