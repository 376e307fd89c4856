"""Captioning one photo, from its file to its caption: the shipped single model against an ensemble.

    python3 benchmarks/caption_latency.py [--photo examples/street.jpg] [--rounds 7] [--threads 2]
                                          [--models flickr8k] [--models flickr8k,flickr8k-2,flickr8k-3]
                                          [--precision auto] [--rerank-both]

Each `--models` entry is one captioner: comma-separated shipped names or checkpoint files (several: their
ensemble); the default compares the single shipped GRU with the shipped default ensemble. Every captioner
is loaded and warmed up first (the first call builds the CNN), then the rounds interleave them, so a busy
machine slows them alike; each figure is the median of its rounds, split into the CNN (image file -> v) and
the guarded beam search (v -> words; with the model's neighbour index, the consensus reranking and the
confidence too). The last column is each captioner's total over the first one's.

--rerank-both: each captioner twice, as it was before the neighbour index (no index: beam --beam-size
alone) and with its index and the default reranking (captioner.model.rerank.Rerank()), side by side.
"""

import argparse
import statistics
import time
from pathlib import Path

import torch

from captioner import checkpoint
from captioner.inference import Captioner
from captioner.model.constraints import Guards
from captioner.model.rerank import Rerank
from captioner.vision.images import load_image

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--photo", default=str(REPO / "examples" / "street.jpg"))
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--beam-size", type=int, default=3)
    p.add_argument("--precision", default="auto", help="auto | fp32 | bf16")
    p.add_argument("--rerank-both", action="store_true",
                   help="time each captioner without its neighbour index and with it (default reranking)")
    p.add_argument("--models", action="append", default=[],
                   help="comma-separated shipped names or checkpoints; given again: another captioner")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    models = args.models or [checkpoint.SINGLE_MODEL, ",".join(checkpoint.DEFAULT_MODELS)]
    caps = {}
    for spec in models:
        cap = Captioner.from_pretrained(spec.split(","), device="cpu", precision=args.precision)
        if args.rerank_both:
            caps[f"{spec} (no index)"] = Captioner(cap.loaded, cap.device, cap.precision)
            caps[f"{spec} reranked"] = cap
        else:
            caps[spec] = cap
    specs = list(caps)
    guards = Guards()
    photo = Path(args.photo)
    times: dict[str, list[tuple[float, float]]] = {spec: [] for spec in specs}

    def once(cap: Captioner) -> tuple[float, float, str]:
        t0 = time.perf_counter()
        encoder = cap.encoder
        with torch.no_grad(), cap.precision.autocast():
            v = encoder(encoder.preprocess(load_image(photo)).unsqueeze(0)).float()
        t1 = time.perf_counter()
        hyp = cap.caption_features(v, beam_size=args.beam_size, guards=guards, rerank=Rerank())[0][0]
        return t1 - t0, time.perf_counter() - t1, cap.text(hyp)

    words = {spec: once(cap)[2] for spec, cap in caps.items()}  # warm-up: builds the CNN, fills the caches
    for _ in range(args.rounds):
        for spec, cap in caps.items():
            cnn, search, _ = once(cap)
            times[spec].append((cnn, search))
    print(f"{photo.name}, beam {args.beam_size}, {args.threads} threads, precision "
          f"{next(iter(caps.values())).precision.name}, median of {args.rounds} interleaved rounds")
    print(f"{'captioner':<44} {'MB':>6} {'CNN ms':>8} {'search ms':>10} {'total ms':>9} {'x first':>8}  caption")
    first = None
    for spec in specs:
        cnn = statistics.median(t[0] for t in times[spec]) * 1e3
        search = statistics.median(t[1] for t in times[spec]) * 1e3
        total = statistics.median(sum(t) for t in times[spec]) * 1e3
        first = first or total
        mb = sum(checkpoint.pretrained_path(name).stat().st_size for name in spec.split(" ")[0].split(",")) / 1e6
        print(f"{spec:<44} {mb:>6.1f} {cnn:>8.1f} {search:>10.1f} {total:>9.1f} {total / first:>7.2f}x  "
              f"{words[spec]}")


if __name__ == "__main__":
    main()
