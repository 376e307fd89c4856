"""The timer the benchmarks share: best of several runs, the figure least disturbed by a busy machine."""

import time


def best_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)
