"""Measure this host's memory bandwidth and peak FP32 compute, the two roofline figures of a
device profile (memory_bandwidth_gbs, peak_gflops), so `bench` can be read against the
machine it ran on rather than a nominal figure. numpy is imported only here, when asked.
"""

from __future__ import annotations

import time


def _best(fn, repeats: int) -> float:
    """Shortest of `repeats` timings in CPU seconds of this process: on a shared machine the
    wall clock also counts the time other processes held the cores, the CPU clock does not
    (for the bandwidth copy, one thread, it is the time the copy actually ran)."""
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        fn()
        best = min(best, time.process_time() - start)
    return best


def measure_bandwidth_gbs(mb: int = 128, repeats: int = 20) -> float:
    """STREAM-style copy: bytes read + written per second over arrays far larger than cache.
    One numpy thread: decode in llama.cpp/onnxruntime reads weights from all cores, so this
    is a floor; on a 2-core VM one core already saturates the memory channel it gets."""
    import numpy as np

    src = np.ones(mb * (1 << 20) // 8)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the pages in before timing
    seconds = _best(lambda: np.copyto(dst, src), repeats)
    return 2 * src.nbytes / seconds / 1e9


def measure_peak_gflops(n: int = 1024, repeats: int = 20) -> float:
    """FP32 matmul through numpy's BLAS: 2 n^3 FLOPs per product over the CPU seconds of all
    its threads is the rate of one core; times the cores this process may use."""
    import os

    import numpy as np

    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    b = a.T.copy()
    a @ b  # warm the BLAS threads
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return 2 * n ** 3 / _best(lambda: a @ b, repeats) / 1e9 * (cores or 1)


def measure_host() -> dict:
    return {"memory_bandwidth_gbs": round(measure_bandwidth_gbs(), 1),
            "peak_gflops": round(measure_peak_gflops(), 1)}
