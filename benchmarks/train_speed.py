"""Teacher-forced training throughput (tokens/s) of the decoder, at Flickr8k sizes, in one run:

1. CaptionDecoder for each cell (fused nn.RNN / nn.LSTM / nn.GRU kernels over whole sequences);
2. a naive per-step nn.LSTMCell loop of the same sizes (what "fast by construction" avoids);
3. the bound set by the matrix multiplies alone: the same GEMMs (forward and both backward products of
   the input, recurrent, image and output projections) timed with torch.mm.

    python benchmarks/train_speed.py [--batch 128 --length 16 --embed 512 --hidden 512 --vocab 3000]

Numbers are wall-clock on whatever machine runs it; compare the ratios printed side by side.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from captioner.config import ModelConfig
from captioner.model.decoder import CaptionDecoder


def timeit(fn, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - start) / iters


class NaiveLSTM(nn.Module):
    """The same model written the slow way: one nn.LSTMCell call per time step, image term per step."""

    def __init__(self, vocab: int, embed: int, hidden: int, feat: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, embed)
        self.image_in = nn.Linear(feat, embed)
        self.cell = nn.LSTMCell(embed, hidden)
        self.out = nn.Linear(hidden, vocab)

    def forward(self, features, inputs):
        B, T = inputs.shape
        h = c = features.new_zeros(B, self.cell.hidden_size)
        outs = []
        for t in range(T):
            x = self.embed(inputs[:, t]) + self.image_in(features)  # image term recomputed every step
            h, c = self.cell(x, (h, c))
            outs.append(self.out(h))
        return torch.stack(outs, 1)


def train_step(model, opt, feats, inputs, targets):
    opt.zero_grad(set_to_none=True)
    logits = model(feats, inputs)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
    loss.backward()
    opt.step()


def gemm_bound(B, T, E, H, V, Fd, gates, warmup, iters) -> float:
    """Seconds per training step spent in the model's matrix multiplies alone (fwd + 2 bwd products)."""
    shapes = [(B * T, E, gates * H), (B * T, H, V), (B, Fd, E)]  # input, output, image projections
    recurrent = (B, H, gates * H)  # once per time step
    total = 0.0
    for (m, k, n), repeat in [(s, 1) for s in shapes] + [(recurrent, T)]:
        a, b, g = torch.randn(m, k), torch.randn(k, n), torch.randn(m, n)
        t = timeit(lambda: (torch.mm(a, b), torch.mm(g, b.t()), torch.mm(a.t(), g)), warmup, iters)
        total += t * repeat
    return total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--length", type=int, default=16)
    p.add_argument("--embed", type=int, default=512)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--vocab", type=int, default=3000)
    p.add_argument("--features", type=int, default=1280)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    args = p.parse_args()
    B, T, E, H, V, Fd = args.batch, args.length, args.embed, args.hidden, args.vocab, args.features
    torch.manual_seed(0)
    feats = torch.randn(B, Fd)
    inputs = torch.randint(4, V, (B, T))
    targets = torch.randint(4, V, (B, T))
    tokens = B * T
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; batch {B}, length {T}, "
          f"embed {E}, hidden {H}, vocab {V}, features {Fd}")
    print(f"{'model':<34}{'s/step':>10}{'tokens/s':>12}{'vs GEMM bound':>15}")
    rows = []
    for cell, gates in [("rnn", 1), ("lstm", 4), ("gru", 3)]:
        model = CaptionDecoder(ModelConfig(cell=cell, embed_dim=E, hidden_dim=H, dropout=0.0), V, Fd)
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        t = timeit(lambda: train_step(model, opt, feats, inputs, targets), args.warmup, args.iters)
        bound = gemm_bound(B, T, E, H, V, Fd, gates, args.warmup, args.iters)
        rows.append((f"CaptionDecoder {cell} (fused)", t, bound))
        if cell == "lstm":
            naive = NaiveLSTM(V, E, H, Fd)
            opt = torch.optim.Adam(naive.parameters(), lr=1e-4)
            tn = timeit(lambda: train_step(naive, opt, feats, inputs, targets), args.warmup, args.iters)
            rows.append(("naive nn.LSTMCell loop", tn, bound))
            rows.append(("GEMM bound (lstm, torch.mm)", bound, bound))
    for name, t, bound in rows:
        print(f"{name:<34}{t:>10.4f}{tokens / t:>12.0f}{bound / t:>14.2f}x")
    fused = dict((n, t) for n, t, _ in rows)
    print(f"fused LSTM is {fused['naive nn.LSTMCell loop'] / fused['CaptionDecoder lstm (fused)']:.2f}x "
          f"the speed of the per-step loop")


if __name__ == "__main__":
    main()
