"""Peak memory and time of one training step with full BPTT against truncated BPTT on long sequences.

    python benchmarks/tbptt_memory.py [--length 200 --batch 64 --hidden 512 --chunks 10 25 50]

Each setting runs in its own process so that its peak resident memory (ru_maxrss) is its own; the
baseline process (model built, no step taken) is printed too, so the step's own share can be read off.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def one(args) -> dict:
    import torch

    from captioner.config import ModelConfig
    from captioner.data.dataset import Batch
    from captioner.model.decoder import CaptionDecoder
    from captioner.train.step import backward_batch

    torch.manual_seed(0)
    cfg = ModelConfig(cell=args.cell, embed_dim=args.hidden, hidden_dim=args.hidden, dropout=0.0)
    model = CaptionDecoder(cfg, vocab_size=args.vocab, feature_dim=1280)
    batch = Batch(torch.randn(args.batch, 1280), torch.randint(4, args.vocab, (args.batch, args.length)),
                  torch.randint(4, args.vocab, (args.batch, args.length)))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    if args.k >= 0:
        backward_batch(model, batch, pad_id=0, tbptt=args.k)
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"k": args.k, "before_mib": before / 1024, "peak_mib": peak / 1024, "seconds": seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--length", type=int, default=200)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--vocab", type=int, default=3000)
    p.add_argument("--cell", default="lstm")
    p.add_argument("--chunks", type=int, nargs="+", default=[10, 25, 50])
    p.add_argument("--k", type=int, help=argparse.SUPPRESS)  # internal: run one setting
    args = p.parse_args()
    if args.k is not None:
        print(json.dumps(one(args)))
        return
    print(f"{args.cell}, length {args.length}, batch {args.batch}, hidden {args.hidden}, vocab {args.vocab}")
    print(f"{'setting':<22}{'peak RSS MiB':>14}{'step MiB':>10}{'seconds':>9}")
    base = None
    for k in [-1, 0, *args.chunks]:
        cmd = [sys.executable, __file__, "--k", str(k), "--length", str(args.length), "--batch", str(args.batch),
               "--hidden", str(args.hidden), "--vocab", str(args.vocab), "--cell", args.cell]
        r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
        name = "no step (baseline)" if k < 0 else ("full BPTT" if k == 0 else f"tbptt K={k}")
        base = r["peak_mib"] if k < 0 else base
        print(f"{name:<22}{r['peak_mib']:>14.0f}{r['peak_mib'] - base:>10.0f}{r['seconds']:>9.2f}")


if __name__ == "__main__":
    main()
