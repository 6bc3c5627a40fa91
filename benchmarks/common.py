"""Shared helpers for the benchmarks: a timer, the machine's own limits, PyTorch if installed.

Timings are the best of several runs (the least disturbed by other processes), in seconds.
The machine limits are measured in the same run as the kernels, so that the two can be
compared even on a busy or throttled machine:
    NumPy float32 matmul GFLOP/s   (OpenBLAS, all cores: what a good GEMM reaches here)
    array copy GB/s                (np.copyto on the same array sizes: bytes read + written)
"""
import os
import platform
import time

import numpy as np


def best_time(fn, repeat=5, number=1, warmup=1):
    """Best of `repeat` timings of `number` calls of fn(), per call, in seconds."""
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, (time.perf_counter() - start) / number)
    return best


def matmul_gflops(n=1024, repeat=5):
    """NumPy float32 matmul GFLOP/s on n x n matrices."""
    a = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    return 2 * n ** 3 / best_time(lambda: a @ a, repeat=repeat) / 1e9


def copy_gbs(numel=1 << 20, dtype=np.float32, repeat=20):
    """np.copyto GB/s (bytes read + bytes written) for arrays of numel elements."""
    src = np.ones(numel, dtype)
    dst = np.empty_like(src)
    return 2 * src.nbytes / best_time(lambda: np.copyto(dst, src), repeat=repeat, number=5) / 1e9


def load_torch(threads):
    """torch with `threads` intra-op threads, or None if it is not installed."""
    try:
        import torch
    except ImportError:
        return None
    torch.set_num_threads(threads)
    return torch


def machine_line():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, NumPy {np.__version__}"


def markdown_table(header, rows):
    """A markdown table; floats are printed with 3 significant digits."""
    def cell(v):
        return f"{v:.3g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
