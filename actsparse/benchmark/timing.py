"""Measurement helpers shared by `actsparse bench` and benchmarks/: memory-bandwidth probe,
timing, cache size. Figures from shared machines drift; only ratios measured in one run mean
anything, and weights must rotate over several times the last-level cache.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np


def l3_cache_bytes(default: int = 32 << 20) -> int:
    """Size of the last-level cache from `lscpu` (falls back to ``default``)."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return default
    match = re.search(r"L3 cache:\s*([\d.]+)\s*([KMG])i?B", text)
    if not match:
        return default
    scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[match.group(2)]
    return int(float(match.group(1)) * scale)


def copy_bandwidth_gbs(nbytes: int = 256 << 20, threads: int | None = None, repeats: int = 5) -> float:
    """Best memory bandwidth (GB/s, bytes read + bytes written) of a numpy copy split over threads.

    numpy releases the GIL while copying, so one slice per core runs in parallel.
    """
    threads = threads or os.cpu_count() or 1
    src = np.ones(nbytes // 4, dtype=np.float32)
    dst = np.empty_like(src)
    bounds = np.linspace(0, src.size, threads + 1).astype(int)
    slices = [slice(bounds[i], bounds[i + 1]) for i in range(threads)]

    def copy_slice(sl: slice) -> None:
        np.copyto(dst[sl], src[sl])

    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(copy_slice, slices))  # first touch
        for _ in range(repeats):
            start = time.perf_counter()
            list(pool.map(copy_slice, slices))
            best = min(best, time.perf_counter() - start)
    return 2 * nbytes / best / 1e9


def time_per_call(call: Callable[[int], None], iters: int, blocks: int = 5, warmup: int = 3) -> float:
    """Seconds per call: the best of ``blocks`` blocks, each the mean of ``iters`` calls.

    ``call(i)`` receives the iteration number so it can rotate weights and inputs.
    The best block is the one least disturbed by other processes on the machine.
    """
    settle()
    for i in range(warmup):
        call(i)
    best = float("inf")
    counter = 0
    for _ in range(blocks):
        start = time.perf_counter()
        for _ in range(iters):
            call(counter)
            counter += 1
        best = min(best, (time.perf_counter() - start) / iters)
    return best


MEMORY_FRACTION = 0.15  # of the memory available now, for one engine's rotating weight copies


def copies_to_exceed_cache(bytes_per_copy: int, factor: float = 4.0, minimum: int = 2) -> int:
    """How many rotating copies of a weight set make the working set ``factor`` x the L3, capped by
    the memory available: a CPU reporting a 480 MB L3 asked for 24 GB of copies and the benchmark
    was killed. When the cap bites, a line on stderr says the weights cannot exceed the cache."""
    import sys

    wanted = max(minimum, int(np.ceil(factor * l3_cache_bytes() / bytes_per_copy)))
    available = available_memory_bytes()
    if available is None:
        return wanted
    allowed = max(minimum, int(MEMORY_FRACTION * available // bytes_per_copy))
    if allowed < wanted:
        print(f"note: {wanted} copies of {bytes_per_copy / 1e6:.1f} MB would exceed {factor:g}x the "
              f"{l3_cache_bytes() / 2**20:.0f} MB L3 but not fit in memory; using {allowed} "
              f"({allowed * bytes_per_copy / l3_cache_bytes():.1f}x the L3): figures may be cache-inflated",
              file=sys.stderr)
        return allowed
    return wanted


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else None."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


# Idle workers of onnxruntime (~45 ms) and TVM (~10 ms with actsparse's spin count, ~150 ms with
# TVM's) keep spinning after a call; timing the next engine inside that window halved its speed.
SETTLE_SECONDS = 0.2


def settle(seconds: float = SETTLE_SECONDS) -> None:
    """Wait until the thread pools of the engine timed before have stopped spinning."""
    time.sleep(seconds)


def interleaved_blocks(engines: dict, iters: dict, blocks: int,
                       settle_seconds: float = SETTLE_SECONDS) -> dict[str, list[float]]:
    """Seconds per call of each engine in every block, blocks taken round-robin across engines.

    Other processes load this shared machine in waves; interleaving gives every engine the
    same chances, where timing one engine after the other let a wave land on one of them.
    Block i of every engine falls in the same stretch of time, so per-block ratios pair up.
    Before each block the previous engine's thread pool is left to go idle (``settle``) and
    one untimed call wakes this engine's own.
    """
    for call in engines.values():
        for i in range(2):
            call(i)
    times: dict[str, list[float]] = {name: [] for name in engines}
    counter = 0
    for _ in range(blocks):
        for name, call in engines.items():
            settle(settle_seconds)
            call(counter)
            start = time.perf_counter()
            for _ in range(iters[name]):
                call(counter)
                counter += 1
            times[name].append((time.perf_counter() - start) / iters[name])
    return times


def interleaved_best(engines: dict, iters: dict, blocks: int, settle_seconds: float = SETTLE_SECONDS) -> dict[str, float]:
    """Seconds per call of each engine: its best block of ``interleaved_blocks``."""
    times = interleaved_blocks(engines, iters, blocks, settle_seconds)
    return {name: min(block_times) for name, block_times in times.items()}


def paired_speedup(reference: list[float], engine: list[float]) -> tuple[float, float, float]:
    """(median, 25th, 75th percentile) over blocks of reference time / engine time, block by block.

    Robust to the drift of a shared machine: one lucky block of either engine moves a ratio of
    best blocks by the full drift, but the median of same-stretch ratios hardly at all.
    """
    ratios = np.asarray(reference) / np.asarray(engine)
    return float(np.median(ratios)), float(np.quantile(ratios, 0.25)), float(np.quantile(ratios, 0.75))
