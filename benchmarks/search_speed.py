"""Decoding speed on cached features: greedy, batched beam 3 / 5, and beam search one image at a time.

    python3 benchmarks/search_speed.py [--images 100] [--threads 2] [--repeats 3]

A CaptionDecoder with Flickr8k sizes (LSTM, embed 512, hidden 512, vocab 3000, features 1280) on random
image vectors. Untrained weights would run every caption to max_len, so the <end> bias is raised until
greedy captions average about 12 words, as trained models' do. All timings come from one run, so the
ratios are comparable even on a noisy machine; each figure is the best of --repeats. The whole run takes
~8 minutes on 2 cores, mostly the per-image loops. Random weights give a bimodal length distribution: the
mean is ~12 words, but about half the captions still run to max_len.
"""

import argparse

import torch

from captioner.config import ModelConfig
from captioner.model.decoder import CaptionDecoder
from captioner.model.search import beam_search, greedy
from timing import best_time  # benchmarks/timing.py, beside this script

END = 2


def build_model(target_len: float, features: torch.Tensor) -> CaptionDecoder:
    torch.manual_seed(0)
    cfg = ModelConfig(cell="lstm", embed_dim=512, hidden_dim=512, num_layers=1, dropout=0.0)
    model = CaptionDecoder(cfg, vocab_size=3000, feature_dim=1280).eval()
    with torch.no_grad():
        model.out.weight.mul_(4.0)  # sharper word choices, like a trained model's
        lo, hi = -10.0, 20.0
        for _ in range(20):  # bisect the <end> bias for the target mean greedy length
            model.out.bias[END] = (lo + hi) / 2
            mean = sum(map(len, greedy(model, features))) / len(features)
            lo, hi = (lo, (lo + hi) / 2) if mean < target_len else ((lo + hi) / 2, hi)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-len", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    features = torch.randn(args.images, 1280)
    model = build_model(12.0, features)
    n, T = args.images, args.max_len
    caps = greedy(model, features, max_len=T)
    print(f"{n} images, {args.threads} threads, max_len {T}; greedy captions average "
          f"{sum(map(len, caps)) / n:.1f} words ({sum(len(c) == T for c in caps)} hit max_len)")

    rows = [("greedy (batched)", lambda: greedy(model, features, max_len=T))]
    for k in (3, 5):
        rows.append((f"beam {k} (batched)", lambda k=k: beam_search(model, features, beam_size=k, max_len=T)))
        rows.append((f"beam {k} (per image)", lambda k=k: [beam_search(model, features[i:i + 1], beam_size=k,
                                                                       max_len=T) for i in range(n)]))
    speed = {}
    for name, fn in rows:
        speed[name] = n / best_time(fn, args.repeats)
        print(f"{name:<22} {speed[name]:9.1f} images/s")
    for k in (3, 5):
        batched, single = speed[f"beam {k} (batched)"], speed[f"beam {k} (per image)"]
        print(f"beam {k}: batched / per-image = {batched / single:.1f}x;"
              f" greedy / batched beam = {speed['greedy (batched)'] / batched:.1f}x")


if __name__ == "__main__":
    main()
