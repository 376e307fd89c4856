"""Where fp32 stays (CPUs without native bf16, or precision = "fp32"): two candidate speed-ups, measured
side by side in one run.

1. fp32 GEMMs through oneDNN instead of the default BLAS route: torch.mm / F.linear against oneDNN's linear
   (torch.ops.mkldnn._linear_pointwise on ordinary tensors, and mkldnn_linear on pre-converted ones), at the
   shapes of the shipped GRU's training step (input, output and recurrent projections).
2. One decoding step: the fused nn.GRU / nn.LSTM layer called on a length-1 sequence against the cell
   function (torch.gru_cell / torch.lstm_cell) on the same weights, at beam-3 batch sizes; plus the whole
   CaptionDecoder.step with each kernel (CaptionDecoder.step_kernel).

    python benchmarks/fp32_paths.py [--threads 2] [--repeats 5]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from timing import best_time  # noqa: E402
from captioner.config import ModelConfig  # noqa: E402
from captioner.model.decoder import CaptionDecoder  # noqa: E402


def gemms(repeats: int, inner: int) -> None:
    print("1. fp32 GEMM, GFLOP/s (best of runs)")
    print(f"{'shape (m x k -> n)':<24}{'F.linear':>10}{'oneDNN':>10}{'oneDNN pre':>12}")
    for m, k, n in [(2048, 512, 1536), (2048, 512, 3000), (128, 512, 1536), (300, 512, 3000)]:
        x, w, b = torch.randn(m, k), torch.randn(n, k), torch.randn(n)
        xm, wm, bm = x.to_mkldnn(), w.to_mkldnn(), b.to_mkldnn()
        flops = 2 * m * k * n * inner
        runs = {
            "F.linear": lambda: [F.linear(x, w, b) for _ in range(inner)],
            "oneDNN": lambda: [torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "") for _ in range(inner)],
            "oneDNN pre": lambda: [torch._C._nn.mkldnn_linear(xm, wm, bm) for _ in range(inner)],
        }
        rates = {name: flops / best_time(fn, repeats) / 1e9 for name, fn in runs.items()}
        print(f"{f'{m} x {k} -> {n}':<24}" + "".join(f"{rates[k_]:>{w_}.1f}" for k_, w_ in
                                                   [("F.linear", 10), ("oneDNN", 10), ("oneDNN pre", 12)]))


def steps(repeats: int, inner: int, hidden: int) -> None:
    print(f"\n2. one decoding step, hidden {hidden}: steps/s (best of runs)")
    print(f"{'cell':<6}{'batch':>6}{'fused layer':>13}{'cell fn':>10}{'ratio':>8}   "
          f"{'step() fused':>13}{'step() cell':>12}{'ratio':>8}")
    for cell in ("gru", "lstm"):
        torch.manual_seed(0)
        model = CaptionDecoder(ModelConfig(cell=cell, embed_dim=hidden, hidden_dim=hidden, dropout=0.0),
                               3000, 1280).eval()
        layer = model.layers[0]
        fn = {"gru": torch.gru_cell, "lstm": torch.lstm_cell}[cell]
        weights = (layer.weight_ih_l0, layer.weight_hh_l0, layer.bias_ih_l0, layer.bias_hh_l0)
        for B in (100, 300):
            x, h = torch.randn(B, hidden), torch.randn(B, hidden)
            hx = (h, h.clone()) if cell == "lstm" else h
            kx = tuple(t[None] for t in hx) if cell == "lstm" else h[None]
            feats, tokens = torch.randn(B, 1280), torch.randint(4, 3000, (B,))
            with torch.no_grad():
                state = model.init_state(feats)
                fused = inner / best_time(lambda: [layer(x[:, None], kx) for _ in range(inner)], repeats)
                cellf = inner / best_time(lambda: [fn(x, hx, *weights) for _ in range(inner)], repeats)
                rates = {}
                for kernel in ("fused", "cell"):
                    model.step_kernel = kernel
                    rates[kernel] = inner / best_time(lambda: [model.step(tokens, state) for _ in range(inner)],
                                                      repeats)
            print(f"{cell:<6}{B:>6}{fused:>13.0f}{cellf:>10.0f}{cellf / fused:>7.2f}x   "
                  f"{rates['fused']:>13.0f}{rates['cell']:>12.0f}{rates['cell'] / rates['fused']:>7.2f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--inner", type=int, default=10, help="calls per timed run")
    p.add_argument("--hidden", type=int, default=512)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}")
    gemms(args.repeats, args.inner)
    steps(args.repeats, args.inner, args.hidden)


if __name__ == "__main__":
    main()
