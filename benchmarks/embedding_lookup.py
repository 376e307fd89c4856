"""What the embedding lookup saves over its definition, one_hot(ids) @ W_xh (forward + backward).

    python3 benchmarks/embedding_lookup.py [--vocab 3000] [--embed 512] [--batch 128] [--length 16]
                                           [--threads 1] [--repeats 5]

Both compute the same (B, T, E) word inputs and the same gradient on W (tests/test_lessons.py checks it).
The one-hot form builds a (B*T, V) float matrix, multiplies it by W (V, E) -- B*T*V*E multiply-adds, almost
all by zero -- and its backward is another dense (V, B*T) @ (B*T, E) product. The lookup copies B*T rows
forward and adds B*T rows into the gradient backward. Memory is what each keeps alive for the backward pass,
measured with autograd's saved-tensor hooks: the ids for the lookup, the (B*T, V) one-hot matrix for the
matmul (the one-hot matrix is also the extra tensor its forward builds). Times are the best of --repeats.
"""

import argparse

import torch
import torch.nn.functional as F
from timing import best_time  # benchmarks/timing.py, beside this script


def lookup(ids: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    return F.embedding(ids, W)  # (B, T, E): row ids[b, t] of W


def one_hot_matmul(ids: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    return F.one_hot(ids, W.shape[0]).to(W.dtype) @ W  # (B, T, V) @ (V, E) -> (B, T, E)


def run(fn, ids, W, grad_out) -> None:
    W.grad = None
    fn(ids, W).backward(grad_out)


def saved_bytes(fn, ids, W) -> int:
    """Bytes autograd keeps for the backward pass (each storage once; W itself excluded)."""
    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() != W.untyped_storage().data_ptr():
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    saved = {}
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(ids, W)
    return sum(saved.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=3000)
    parser.add_argument("--embed", type=int, default=512)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--length", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    V, E, B, T = args.vocab, args.embed, args.batch, args.length
    W = torch.randn(V, E, requires_grad=True)
    ids = torch.randint(V, (B, T))
    grad_out = torch.randn(B, T, E)

    rows = {}
    for name, fn in (("lookup", lookup), ("one-hot @ W", one_hot_matmul)):
        run(fn, ids, W, grad_out)  # warm-up
        seconds = best_time(lambda: run(fn, ids, W, grad_out), args.repeats)
        rows[name] = (seconds, saved_bytes(fn, ids, W))
    print(f"vocab {V}, embed {E}, batch {B} x length {T} = {B * T} words, {args.threads} thread(s), "
          f"forward+backward, best of {args.repeats}")
    print(f"{'':<14} {'time ms':>9} {'saved for backward':>19} {'GFLOP fwd+bwd':>14}")
    flops = {"lookup": 0.0, "one-hot @ W": 2 * 2 * B * T * V * E / 1e9}
    for name, (s, saved) in rows.items():
        print(f"{name:<14} {s * 1e3:>9.2f} {saved / 2**10:>16.1f} KB {flops[name]:>14.2f}")
    (ts, ss), (tm, sm) = rows["lookup"], rows["one-hot @ W"]
    print(f"one-hot / lookup: time {tm / ts:.1f}x, memory saved for backward {sm / max(ss, 1):.0f}x")


if __name__ == "__main__":
    main()
