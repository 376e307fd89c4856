"""Decoding speed on cached features: greedy, batched beam 3 / 5, and beam search one image at a time,
in fp32 and bf16 side by side, each with its % of the matrix-multiply bound of its own precision.

    python3 benchmarks/search_speed.py [--images 100] [--threads 2] [--repeats 3] [--precisions fp32,bf16]
                                       [--no-per-image]

The bound: every decoder row that a search step processes costs the step's GEMMs (input, recurrent and
output projections of one row); the search is timed once more counting its rows, and those rows' GEMMs
are timed with torch.mm on tensors of that precision at a beam-sized batch.

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
from captioner.precision import resolve
from timing import best_time, gemm_seconds  # benchmarks/timing.py, beside this script

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


class RowCounter:
    """The decoder seen through a counter of the rows its steps process."""

    def __init__(self, model):
        self.model, self.rows = model, 0

    def init_state(self, features):
        return self.model.init_state(features)

    def step(self, tokens, state):
        self.rows += tokens.shape[0]
        return self.model.step(tokens, state)

    def select_state(self, state, index):
        return self.model.select_state(state, index)


def seconds_per_row(model: CaptionDecoder, dtype: torch.dtype, rows: int, repeats: int) -> float:
    """The GEMMs of one decoding step for one row: input and recurrent projections, then the output one."""
    E, H, V = model.cfg.embed_dim, model.cfg.hidden_dim, model.vocab_size
    gates = {"rnn": 1, "lstm": 4, "gru": 3}[model.cfg.cell]
    return sum(gemm_seconds(rows, k, n, dtype, repeats) for k, n in [(E, gates * H), (H, gates * H), (H, V)]) / rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-len", type=int, default=20)
    parser.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16")
    parser.add_argument("--no-per-image", action="store_true", help="skip the (slow) one-image-at-a-time loops")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    features = torch.randn(args.images, 1280)
    model = build_model(12.0, features)
    n, T = args.images, args.max_len
    caps = greedy(model, features, max_len=T)
    print(f"{n} images, {args.threads} threads, max_len {T}; greedy captions average "
          f"{sum(map(len, caps)) / n:.1f} words ({sum(len(c) == T for c in caps)} hit max_len)")

    searches = [("greedy (batched)", lambda m: greedy(m, features, max_len=T))]
    for k in (3, 5):
        searches.append((f"beam {k} (batched)", lambda m, k=k: beam_search(m, features, beam_size=k, max_len=T)))
        if not args.no_per_image:
            searches.append((f"beam {k} (per image)", lambda m, k=k: [
                beam_search(m, features[i:i + 1], beam_size=k, max_len=T) for i in range(n)]))
    speed = {}
    print(f"{'search':<22}{'prec':>6}{'images/s':>11}{'% of bound':>12}{'bf16/fp32':>11}")
    for name in args.precisions.split(","):
        precision = resolve(name, "cpu")
        print(precision.describe())
        per_row = seconds_per_row(model, precision.dtype, 3 * n, args.repeats)
        for search, fn in searches:
            with precision.autocast():
                seconds = best_time(lambda: fn(model), args.repeats)
                counter = RowCounter(model)
                fn(counter)
            speed[search, name] = n / seconds
            ratio = f"{speed[search, name] / speed[search, 'fp32']:>10.2f}x" if name == "bf16" and (
                search, "fp32") in speed else ""
            print(f"{search:<22}{name:>6}{n / seconds:>11.1f}{100 * counter.rows * per_row / seconds:>11.0f}%{ratio}")
    for name in args.precisions.split(","):
        for k in (3, 5):
            batched = speed[f"beam {k} (batched)", name]
            single = speed.get((f"beam {k} (per image)", name))
            line = f"{name} beam {k}: greedy / batched beam = {speed['greedy (batched)', name] / batched:.1f}x"
            print(line + (f"; batched / per-image = {batched / single:.1f}x" if single else ""))


if __name__ == "__main__":
    main()
