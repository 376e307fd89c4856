"""An RNN decoder's trade-offs: cost grows with caption length, size does not; batch is the only parallelism.

    python3 benchmarks/rnn_tradeoffs.py [--batch 32] [--lengths 5 10 20 40] [--batches 1 8 32 128 512]
                                        [--threads 1] [--repeats 2]

A CaptionDecoder with Flickr8k sizes (LSTM, embed 512, hidden 512, vocab 3000, features 1280) on random
image vectors. The <end> logit is pinned to -1e9 so greedy decoding runs exactly max_len steps.

1. Length: greedy at fixed batch for max_len 5..40. The same weights serve every length (the parameter
   count column does not move) -- weight sharing across time -- but each word is one more sequential step,
   so time grows linearly: the time per word column stays flat.
2. Batch: greedy at max_len 20 for batch 1..512. The steps cannot run in parallel (step t needs word t-1),
   so the only parallelism is across images: one step is a (B, 512) x (512, 4*512) and (B, 512) x
   (512, 3000) product, and larger B fills the matrix units, until compute-bound.
Times are the best of --repeats; --threads 1 by default, the machine may be shared.
"""

import argparse

import torch

from captioner.config import ModelConfig
from captioner.model.decoder import CaptionDecoder
from captioner.model.search import greedy
from timing import best_time  # benchmarks/timing.py, beside this script

END = 2


def build_model() -> CaptionDecoder:
    torch.manual_seed(0)
    cfg = ModelConfig(cell="lstm", embed_dim=512, hidden_dim=512, num_layers=1, dropout=0.0)
    model = CaptionDecoder(cfg, vocab_size=3000, feature_dim=1280).eval()
    with torch.no_grad():
        model.out.bias[END] = -1e9  # never ends: every caption is exactly max_len words
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32, help="batch for the length table")
    parser.add_argument("--lengths", type=int, nargs="+", default=[5, 10, 20, 40])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32, 128, 512])
    parser.add_argument("--max-len", type=int, default=20, help="caption length for the batch table")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = build_model()
    params = sum(p.numel() for p in model.parameters())
    greedy(model, torch.randn(2, 1280), max_len=2)  # warm-up

    print(f"LSTM 512/512, vocab 3000; {args.threads} thread(s), best of {args.repeats}")
    print(f"\n1. caption length (batch {args.batch})")
    print(f"{'max_len':>7} {'parameters':>11} {'time ms':>9} {'ms per word':>12} {'time / time@first':>18}")
    feats = torch.randn(args.batch, 1280)
    first = None
    for T in args.lengths:
        caps = greedy(model, feats, max_len=T)
        assert all(len(c) == T for c in caps), "a caption ended early"
        s = best_time(lambda: greedy(model, feats, max_len=T), args.repeats)
        first = first or s
        print(f"{T:>7} {params:>11,} {s * 1e3:>9.1f} {s * 1e3 / T:>12.2f} {s / first:>18.2f}")

    print(f"\n2. batch size (max_len {args.max_len})")
    print(f"{'batch':>7} {'time ms':>9} {'ms per step':>12} {'images/s':>10} {'vs batch ' + str(args.batches[0]):>12}")
    base = None
    for B in args.batches:
        feats = torch.randn(B, 1280)
        s = best_time(lambda: greedy(model, feats, max_len=args.max_len), args.repeats)
        rate = B / s
        base = base or rate
        print(f"{B:>7} {s * 1e3:>9.1f} {s * 1e3 / args.max_len:>12.2f} {rate:>10.1f} {rate / base:>11.1f}x")


if __name__ == "__main__":
    main()
