"""The timer the benchmarks share: best of several runs, the figure least disturbed by a busy machine."""

import time


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def gemm_seconds(m: int, k: int, n: int, dtype, repeats: int) -> float:
    """The fastest (m, k) x (k, n) product this build offers in `dtype`: torch.mm or F.linear, whichever
    is quicker (they can take different kernels, e.g. oneDNN for linear and a plain loop for mm)."""
    import torch
    import torch.nn.functional as F

    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    w = b.t().contiguous()
    return min(best_time(lambda: torch.mm(a, b), repeats), best_time(lambda: F.linear(a, w), repeats))
