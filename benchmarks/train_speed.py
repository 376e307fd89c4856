"""Teacher-forced training throughput (tokens/s) of the decoder, at Flickr8k sizes, fp32 and bf16 in one run:

1. CaptionDecoder for each cell (fused nn.RNN / nn.LSTM / nn.GRU kernels over whole sequences), the
   training step as train.py runs it (autocast for bf16, fp32 loss and AdamW state), with each form of the
   output layer and loss side by side: "chunked" (captioner.model.output: a few hundred tokens at a time,
   what training runs) and "plain" (the whole (tokens, vocabulary) logits, their fp32 copy, F.cross_entropy);
2. a naive per-step nn.LSTMCell loop of the same sizes, fp32 (what "fast by construction" avoids);
3. the bound set by the matrix multiplies alone: the same GEMMs (forward and both backward products of
   the input, recurrent, image and output projections) timed with torch.mm on tensors of that precision.
   Each model's "% of bound" is its step time against the bound of its own precision.

    python benchmarks/train_speed.py [--batch 128 --length 16 --embed 512 --hidden 512 --vocab 3000]
                                     [--precisions fp32,bf16] [--losses chunked,plain] [--iters 5]

Numbers are wall-clock on whatever machine runs it; compare the ratios printed side by side. The variants
of one precision are timed in interleaved rounds and each keeps its best round, so a busy machine
disturbs them alike. "faults/step" counts the minor page faults of one step (fresh memory the kernel had
to map): the cost of large temporaries. bf16 is measured even where the CPU emulates it (the log line
says so): there it is expected to be slower.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
import torch.nn.functional as F
from torch import nn

from captioner import allocator
from captioner.config import ModelConfig
from captioner.model.decoder import CaptionDecoder
from captioner.model.output import Targets
from captioner.precision import resolve
from timing import gemm_seconds  # benchmarks/timing.py, beside this script


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


def train_step(model, opt, feats, inputs, targets, precision=None, loss="plain"):
    opt.zero_grad(set_to_none=True)
    with precision.autocast() if precision is not None else torch.autocast("cpu", enabled=False):
        if loss == "chunked":  # as training runs it: the scored tokens' loss, chunked (captioner.model.output)
            mask = targets != 0
            out = model(feats, inputs, mask, Targets(targets[mask], 1.0 / targets.numel()))
        else:
            logits = model(feats, inputs)
    if loss != "chunked":
        out = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))
    out.backward()
    opt.step()


def interleaved(steps: dict, warmup: int, iters: int) -> dict:
    """{name: step fn} -> {name: (best seconds, minor page faults of that step)}, timed in rounds."""
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    best = {name: (float("inf"), 0) for name in steps}
    for _ in range(iters):
        for name, fn in steps.items():
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            start = time.perf_counter()
            fn()
            t = time.perf_counter() - start
            faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
            if t < best[name][0]:
                best[name] = (t, faults)
    return best


def gemm_bound(B, T, E, H, V, Fd, gates, warmup, iters, dtype=torch.float32) -> float:
    """Seconds per training step spent in the model's matrix multiplies alone (fwd + 2 bwd products)."""
    shapes = [(B * T, E, gates * H), (B * T, H, V), (B, Fd, E)]  # input, output, image projections
    recurrent = (B, H, gates * H)  # once per time step
    total = 0.0
    for (m, k, n), repeat in [(s, 1) for s in shapes] + [(recurrent, T)]:
        # forward (m, k) x (k, n), then the two backward products (m, n) x (n, k) and (k, m) x (m, n)
        total += repeat * sum(gemm_seconds(*shape, dtype, iters) for shape in [(m, k, n), (m, n, k), (k, m, n)])
    return total


def main() -> None:
    allocator.print_line()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--length", type=int, default=16)
    p.add_argument("--embed", type=int, default=512)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--vocab", type=int, default=3000)
    p.add_argument("--features", type=int, default=1280)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16")
    p.add_argument("--cells", default="rnn,lstm,gru")
    p.add_argument("--losses", default="chunked,plain", help="comma-separated: chunked, plain")
    args = p.parse_args()
    B, T, E, H, V, Fd = args.batch, args.length, args.embed, args.hidden, args.vocab, args.features
    torch.manual_seed(0)
    feats = torch.randn(B, Fd)
    inputs = torch.randint(4, V, (B, T))
    targets = torch.randint(4, V, (B, T))
    tokens = B * T
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; batch {B}, length {T}, "
          f"embed {E}, hidden {H}, vocab {V}, features {Fd}")
    precisions = [resolve(name, "cpu") for name in args.precisions.split(",")]
    for precision in precisions:
        print(precision.describe())
    gates_of = {"rnn": 1, "lstm": 4, "gru": 3}
    losses = args.losses.split(",")
    rows = []  # (name, precision, seconds, bound seconds, faults)
    for precision in precisions:
        bounds, steps = {}, {}
        for cell in args.cells.split(","):
            torch.manual_seed(0)
            model = CaptionDecoder(ModelConfig(cell=cell, embed_dim=E, hidden_dim=H, dropout=0.0), V, Fd)
            opt = torch.optim.Adam(model.parameters(), lr=1e-4)
            for loss in losses:
                steps[(cell, loss)] = (lambda m=model, o=opt, l=loss:
                                       train_step(m, o, feats, inputs, targets, precision, l))
            if cell == "lstm" and precision.name == "fp32":
                naive = NaiveLSTM(V, E, H, Fd)
                nopt = torch.optim.Adam(naive.parameters(), lr=1e-4)
                steps[("naive", "plain")] = lambda: train_step(naive, nopt, feats, inputs, targets)
            bounds[cell] = gemm_bound(B, T, E, H, V, Fd, gates_of[cell], args.warmup, args.iters, precision.dtype)
        for (cell, loss), (t, faults) in interleaved(steps, args.warmup, args.iters).items():
            name = "naive nn.LSTMCell loop" if cell == "naive" else f"CaptionDecoder {cell}, {loss} loss"
            rows.append((name, precision.name, t, bounds["lstm" if cell == "naive" else cell], faults))
        for cell, bound in bounds.items():
            rows.append((f"GEMM bound ({cell}, torch.mm)", precision.name, bound, bound, None))
    print(f"{'model':<36}{'prec':>6}{'s/step':>10}{'tokens/s':>11}{'% bound':>9}{'faults/step':>13}"
          f"{'bf16/fp32':>11}{'vs plain':>10}")
    speed = {(n, p): t for n, p, t, _, _ in rows}
    for name, prec, t, bound, faults in rows:
        other = speed.get((name, "fp32"))
        ratio = f"{other / t:>10.2f}x" if prec == "bf16" and other else " " * 11
        plain = speed.get((name.replace("chunked loss", "plain loss"), prec)) if "chunked" in name else None
        gain = f"{plain / t:>9.2f}x" if plain else ""
        shown = f"{faults:>13d}" if faults is not None else " " * 13
        print(f"{name:<36}{prec:>6}{t:>10.4f}{tokens / t:>11.0f}{100 * bound / t:>8.0f}%{shown}{ratio}{gain}")
    naive, fused = ("naive nn.LSTMCell loop", "fp32"), (f"CaptionDecoder lstm, {losses[0]} loss", "fp32")
    if naive in speed and fused in speed:
        print(f"fused LSTM ({losses[0]} loss) is {speed[naive] / speed[fused]:.2f}x the speed of the per-step "
              f"loop (fp32)")


if __name__ == "__main__":
    main()
