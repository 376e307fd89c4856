"""The memory allocator's share of a training step: glibc as it is, glibc with GLIBC_TUNABLES that keep
large blocks in the heap, jemalloc and tcmalloc through LD_PRELOAD (where installed), side by side.

An allocator is fixed when a process starts, so this script re-runs itself in one child process per
allocator (per thread count), each with its environment; every child says which allocator actually runs
in it ("jemalloc-tuned" is jemalloc with MALLOC_CONF=captioner.allocator.JEMALLOC_TUNED). The children stay up and
take turns: one run of one measurement each, the order rotating, so that a busy machine slows every
row alike. Two measurements:

  exp   torch.exp of one (tokens x vocabulary) fp32 tensor into a fresh tensor, the allocation pattern
        of the output layer (and into a preallocated one, the same arithmetic with no allocation);
  step  the Flickr8k training step as train.py runs it: the shipped GRU decoder's sizes (the flickr8k
        config), captioner.train.step.backward_batch with label smoothing, gradient clipping, AdamW;
        fp32, and bf16 under autocast.

    python benchmarks/allocator.py [--threads 1,2] [--iters 10] [--precisions fp32,bf16] [--vocab 3000]

Times are each row's median; tokens/s are per training step; "vs glibc" is the median over rounds of
glibc's step time over this row's, the two run back to back; "faults" are the minor page faults of one
step (the kernel zero-filling memory the allocator took back from it), which no busy machine disturbs.
"exp out=" allocates nothing: where it differs between rows, that is the machine's noise. "peak MB" is
the child's peak resident memory (what the memory kept for reuse costs).
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


def variants() -> list[tuple[str, dict[str, str]]]:
    rows = [("glibc", {}), ("glibc-tuned", {"GLIBC_TUNABLES": allocator.GLIBC_TUNED})]
    for name, path in LIBS.items():
        if os.path.isfile(path):
            rows.append((name, {"LD_PRELOAD": path}))
            if name == "jemalloc":
                rows.append(("jemalloc-tuned", {"LD_PRELOAD": path, "MALLOC_CONF": allocator.JEMALLOC_TUNED}))
        else:
            print(f"note: {name} skipped, {path} is not installed (apt-get install "
                  f"{'libjemalloc2' if name == 'jemalloc' else 'libtcmalloc-minimal4'})")
    return rows


# ---- a child: one allocator, its tensors and models built once, one timed run per request ------------

def serve(args) -> None:
    """Build the tensors and models, warm each up, then answer every line naming a measurement ("exp",
    "exp_out", "fp32", "bf16") with its time in seconds and the page faults it took."""
    import resource

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
    runs = {"exp": lambda: torch.exp(x), "exp_out": lambda: torch.exp(x, out=buf)}
    cfg = load_config("flickr8k")
    batch = Batch(torch.randn(B, args.features), torch.randint(4, V, (B, T)), torch.randint(4, V, (B, T)))

    def training_step(precision):
        torch.manual_seed(0)
        model = CaptionDecoder(cfg.model, V, args.features)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)

        def step():
            opt.zero_grad(set_to_none=True)
            backward_batch(model, batch, 0, cfg.train.label_smoothing, autocast=precision.autocast)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            opt.step()
        return step

    for name in args.precisions.split(","):
        runs[name] = training_step(resolve(name, "cpu"))
    for fn in runs.values():
        for _ in range(args.warmup):
            fn()
    print(json.dumps({"allocator": allocator.describe(), "threads": torch.get_num_threads()}), flush=True)
    for line in sys.stdin:
        if line.strip() == "peak_mb":
            print(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024, flush=True)
            continue
        fn = runs[line.strip()]
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        fn()
        seconds = time.perf_counter() - start
        print(seconds, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults, flush=True)


# ---- the parent: one child per allocator, requests round-robin ----------------------------------------

def measure(rows, threads: int, args) -> dict[str, dict]:
    """Start one child per row, then ask each in turn for one run of every measurement, rotating the
    order, so that a busy machine slows every row alike. Returns each row's times per measurement."""
    base = {k: v for k, v in os.environ.items() if k not in allocator.USER_VARS and k != allocator.MARKER}
    base[allocator.CHOICE] = "system"  # the rows set the allocator, not captioner
    opts = [f"--{k}={getattr(args, k)}" for k in ("warmup", "precisions", "batch", "length", "vocab", "features")]
    children = {}
    for name, env in rows:
        env = {**base, **env, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
        children[name] = subprocess.Popen([sys.executable, __file__, "--child", *opts], env=env, text=True,
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    result = {}
    for name, child in children.items():  # each child says what it runs with once it is warm
        line = child.stdout.readline()
        if not line:
            sys.exit(f"{name} ({threads} threads) failed to start")
        result[name] = {**json.loads(line), "times": {}, "faults": {}}
    keys = ["exp", "exp_out", *args.precisions.split(",")]
    names = list(children)
    for i in range(args.iters):
        order = names[i % len(names):] + names[:i % len(names)]
        for key in keys:
            for name in order:
                children[name].stdin.write(key + "\n")
                children[name].stdin.flush()
                seconds, faults = children[name].stdout.readline().split()
                result[name]["times"].setdefault(key, []).append(float(seconds))
                result[name]["faults"].setdefault(key, []).append(int(faults))
        print(f"  {threads} thread(s): {i + 1}/{args.iters}", file=sys.stderr, flush=True)
    for name, child in children.items():
        child.stdin.write("peak_mb\n")
        child.stdin.flush()
        result[name]["peak_mb"] = int(child.stdout.readline().split()[1])
        child.stdin.close()
        child.wait()
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", default="1,2", help="comma-separated OMP_NUM_THREADS values")
    p.add_argument("--iters", type=int, default=10, help="timed runs of each measurement per row")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--length", type=int, default=16, help="tokens per caption")
    p.add_argument("--vocab", type=int, default=3000)
    p.add_argument("--features", type=int, default=1280, help="EfficientNet-Lite0's feature size")
    p.add_argument("--json", metavar="OUT", help="also write every time and fault count (OUT.<n>threads.json)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        serve(args)
        return

    allocator.print_line()
    rows = variants()
    print(f"batch {args.batch} x {args.length} tokens, vocabulary {args.vocab}: one (tokens x vocabulary) fp32 "
          f"tensor is {args.batch * args.length * args.vocab * 4 / 1e6:.1f} MB; {os.cpu_count()} CPUs here",
          flush=True)
    tokens = args.batch * args.length
    precisions = args.precisions.split(",")
    header = (f"{'threads':>7}  {'row':<15} {'ran with':<36} {'exp fresh':>9} {'exp out=':>9}"
              + "".join(f" {p + ' tok/s':>11} {'vs glibc':>8} {'faults':>7}" for p in precisions) + "  peak MB")
    for n in [int(t) for t in args.threads.split(",")]:
        result = measure(rows, n, args)
        if args.json:
            Path(args.json).with_suffix(f".{n}threads.json").write_text(json.dumps(result))
        print(header)
        for name, _ in rows:
            r, glibc = result[name], result["glibc"]
            med = {key: statistics.median(times) for key, times in r["times"].items()}
            line = f"{n:>7}  {name:<15} {r['allocator']:<36} {1e3 * med['exp']:>7.1f}ms {1e3 * med['exp_out']:>7.1f}ms"
            for prec in precisions:
                # each glibc step against this row's step of the same round: the pair ran back to back
                paired = statistics.median(g / t for g, t in zip(glibc["times"][prec], r["times"][prec]))
                line += (f" {tokens / med[prec]:>11.0f} {paired:>7.2f}x "
                         f"{statistics.median(r['faults'][prec]):>7.0f}")
            print(f"{line} {r['peak_mb']:>8}", flush=True)


if __name__ == "__main__":
    main()
