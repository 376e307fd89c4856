"""The memory allocator's share of a training step: glibc as it is, glibc with GLIBC_TUNABLES that keep
large blocks in the heap, jemalloc and tcmalloc through LD_PRELOAD (where installed), side by side.

An allocator is fixed when a process starts, so this script re-runs itself in one subprocess per
allocator and thread count, interleaved over --rounds rounds (a busy machine disturbs every row alike),
and each subprocess prints the allocator that actually ran in it ("jemalloc-tuned" is jemalloc with
MALLOC_CONF=JEMALLOC_TUNED below). Two measurements:

  exp   torch.exp of one (tokens x vocabulary) fp32 tensor into a fresh tensor, the allocation pattern
        of the output layer (and into a preallocated one, the same arithmetic with no allocation);
  step  the Flickr8k training step as train.py runs it: the shipped GRU decoder's sizes (the flickr8k
        config), captioner.train.step.backward_batch with label smoothing, gradient clipping, AdamW;
        fp32, and bf16 under autocast.

    python benchmarks/allocator.py [--threads 1,2] [--rounds 3] [--iters 4] [--precisions fp32,bf16]

Tokens/s are from each row's median step; "vs glibc" is the ratio to glibc's default in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the checkout's captioner, run from anywhere

from captioner import allocator  # noqa: E402

LIBS = {"jemalloc": "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2",
        "tcmalloc": "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"}
# jemalloc 5 purges freed blocks of 8 MiB and more at once (its oversize arena); this keeps them.
JEMALLOC_TUNED = "oversize_threshold:0,dirty_decay_ms:-1,muzzy_decay_ms:-1"


def variants() -> list[tuple[str, dict[str, str]]]:
    rows = [("glibc", {}), ("glibc-tuned", {"GLIBC_TUNABLES": allocator.GLIBC_TUNED})]
    for name, path in LIBS.items():
        if os.path.isfile(path):
            rows.append((name, {"LD_PRELOAD": path}))
            if name == "jemalloc":
                rows.append(("jemalloc-tuned", {"LD_PRELOAD": path, "MALLOC_CONF": JEMALLOC_TUNED}))
        else:
            print(f"note: {name} skipped, {path} is not installed (apt-get install "
                  f"{'libjemalloc2' if name == 'jemalloc' else 'libtcmalloc-minimal4'})")
    return rows


# ---- the measurements, run in a child process -------------------------------------------------------

def _times(fn, warmup: int, iters: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def measure(args) -> dict:
    import torch

    from captioner.config import load_config
    from captioner.data.dataset import Batch
    from captioner.model.decoder import CaptionDecoder
    from captioner.precision import resolve
    from captioner.train.step import backward_batch

    torch.manual_seed(0)
    B, T, V = args.batch, args.length, args.vocab
    x = torch.randn(B * T, V)
    buf = torch.empty_like(x)
    result = {"allocator": allocator.describe(), "threads": torch.get_num_threads(),
              "exp": _times(lambda: torch.exp(x), 3, 20), "exp_out": _times(lambda: torch.exp(x, out=buf), 3, 20)}
    del x, buf
    cfg = load_config("flickr8k")
    batch = Batch(torch.randn(B, args.features), torch.randint(4, V, (B, T)), torch.randint(4, V, (B, T)))
    for name in args.precisions.split(","):
        precision = resolve(name, "cpu")
        torch.manual_seed(0)
        model = CaptionDecoder(cfg.model, V, args.features)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)

        def step():
            opt.zero_grad(set_to_none=True)
            backward_batch(model, batch, 0, cfg.train.label_smoothing, autocast=precision.autocast)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            opt.step()

        result[name] = _times(step, args.warmup, args.iters)
    return result


# ---- the parent: one child per allocator and thread count, interleaved --------------------------------

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", default="1,2", help="comma-separated OMP_NUM_THREADS values")
    p.add_argument("--rounds", type=int, default=3, help="times every row runs, interleaved")
    p.add_argument("--iters", type=int, default=4, help="timed steps per row and round")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--length", type=int, default=16, help="tokens per caption")
    p.add_argument("--vocab", type=int, default=3000)
    p.add_argument("--features", type=int, default=1280, help="EfficientNet-Lite0's feature size")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(args)))
        return

    allocator.print_line()
    rows = variants()
    print(f"batch {args.batch} x {args.length} tokens, vocabulary {args.vocab}: one (tokens x vocabulary) fp32 "
          f"tensor is {args.batch * args.length * args.vocab * 4 / 1e6:.1f} MB; {os.cpu_count()} CPUs here",
          flush=True)
    threads = [int(t) for t in args.threads.split(",")]
    child_args = [f"--{k}={getattr(args, k)}" for k in ("iters", "warmup", "precisions", "batch", "length",
                                                           "vocab", "features")]
    base = {k: v for k, v in os.environ.items() if k not in allocator.USER_VARS and k != allocator.MARKER}
    base[allocator.CHOICE] = "system"  # the rows set the allocator, not captioner
    runs: dict[tuple[str, int], list[dict]] = {}
    for r in range(args.rounds):
        for n in threads:
            for name, env in rows:
                cmd = [sys.executable, __file__, "--child", *child_args]
                env = {**base, **env, "OMP_NUM_THREADS": str(n), "MKL_NUM_THREADS": str(n)}
                done = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if done.returncode:
                    sys.exit(f"{name}, {n} threads failed:\n{done.stderr[-2000:]}")
                runs.setdefault((name, n), []).append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(f"  round {r + 1}/{args.rounds}, {n} thread(s), {name}: done", file=sys.stderr, flush=True)

    tokens = args.batch * args.length
    precisions = args.precisions.split(",")
    print(f"\n{'threads':>7}  {'row':<15} {'ran with':<36} {'exp fresh':>9} {'exp out=':>9}"
          + "".join(f" {p + ' tok/s':>11} {'vs glibc':>8}" for p in precisions))
    for n in threads:
        med = {(name, key): statistics.median(t for run in runs[(name, n)] for t in run[key])
               for name, _ in rows for key in ["exp", "exp_out", *precisions]}
        for name, _ in rows:
            ran = runs[(name, n)][0]["allocator"]
            line = (f"{n:>7}  {name:<15} {ran:<36} {1e3 * med[(name, 'exp')]:>7.1f}ms "
                    f"{1e3 * med[(name, 'exp_out')]:>7.1f}ms")
            for prec in precisions:
                line += f" {tokens / med[(name, prec)]:>11.0f} {med[('glibc', prec)] / med[(name, prec)]:>7.2f}x"
            print(line)


if __name__ == "__main__":
    main()
