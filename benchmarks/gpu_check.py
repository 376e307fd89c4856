"""One short command to check a GPU machine: training tokens/s and beam-search images/s, CUDA next to CPU.

    python benchmarks/gpu_check.py [--batch 128 --length 16 --hidden 512 --vocab 3000 --images 100]

Without CUDA it says so and prints the CPU figures alone. On CUDA the training step runs the way
train.py runs it (mixed_precision: bf16 autocast where supported, fp16 with a GradScaler otherwise).
"""

from __future__ import annotations

import argparse
import time

import torch

from captioner.config import ModelConfig
from captioner.data.dataset import Batch
from captioner.model.decoder import CaptionDecoder
from captioner.model.search import beam_search, greedy
from captioner.train.step import backward_batch, mixed_precision


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    return (time.perf_counter() - start) / iters


def measure(device: torch.device, args) -> dict[str, float]:
    torch.manual_seed(0)
    cfg = ModelConfig(cell="lstm", embed_dim=args.hidden, hidden_dim=args.hidden, dropout=0.0)
    model = CaptionDecoder(cfg, args.vocab, 1280).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    autocast, scaler = mixed_precision(device)
    B, T = args.batch, args.length
    batch = Batch(torch.randn(B, 1280), torch.randint(4, args.vocab, (B, T)),
                  torch.randint(4, args.vocab, (B, T))).to(device)

    def train_step():
        opt.zero_grad(set_to_none=True)
        backward_batch(model, batch, 0, autocast=autocast, scaler=scaler)
        scaler.step(opt)
        scaler.update()

    iters = args.iters if device.type == "cuda" else max(1, args.iters // 5)
    out = {"train tokens/s": B * T / timed(train_step, device, 2, iters)}
    model.eval()
    feats = torch.randn(args.images, 1280, device=device)
    with torch.no_grad():
        model.out.bias[2] += 2.0  # make <end> likely enough that untrained captions have realistic lengths
    out["greedy images/s"] = args.images / timed(lambda: greedy(model, feats), device, 1, max(1, iters // 2))
    for k in (3, 5):
        out[f"beam {k} images/s"] = args.images / timed(lambda: beam_search(model, feats, beam_size=k),
                                                         device, 1, max(1, iters // 2))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--length", type=int, default=16)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--vocab", type=int, default=3000)
    p.add_argument("--images", type=int, default=100)
    p.add_argument("--iters", type=int, default=20)
    args = p.parse_args()
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.insert(0, torch.device("cuda"))
        print(f"CUDA: {torch.cuda.get_device_name(0)}, bf16 supported: {torch.cuda.is_bf16_supported()}")
    else:
        print("no CUDA device: CPU figures only")
    results = {d.type: measure(d, args) for d in devices}
    names = list(next(iter(results.values())))
    print(f"{'':<20}" + "".join(f"{d:>14}" for d in results) + ("      cuda/cpu" if "cuda" in results else ""))
    for name in names:
        row = f"{name:<20}" + "".join(f"{results[d][name]:>14.0f}" for d in results)
        if "cuda" in results:
            row += f"{results['cuda'][name] / results['cpu'][name]:>13.1f}x"
        print(row)


if __name__ == "__main__":
    main()
