"""Time the CPU attention kernels over the KV cache (kernels/cpu/attention.py) at growing context.

SmolLM-360M shape: 5 kv heads, group 3 (15 query heads), head_dim 64, cache capacity 2048, float32
and float16 caches. Decode (one token at position p = 32, 512, 1024, 2000) and prefill (a chunk of
32 prompt tokens from position 0, 224, 480: the first, a middle and the last chunk of a 512-token
prompt). Each call reads another of `copies` caches (a model reads one per layer, never twice in a
row), enough that the bytes one call reads, times the copies, exceed the L3 four times at 1,024
positions.

Engines, timed in interleaved rounds (``actsparse.benchmark.timing.interleaved_blocks``):

  kernel      this checkout's kernels
  baseline    with ``--baseline REF``: the kernels of attention.py at git revision REF (loaded
              from ``git show``), on the same caches
  read_probe  decode only: a two-thread read of as many bytes as the call's keys and values
              (``kernels/cpu/probe.read_sum``) rotating over as many copies

A time is the median over rounds; ``vs_probe`` the median over rounds of kernel time / probe
time (1.0: the kernel reads its cache as fast as a plain read); ``speedup`` the median over
rounds of baseline time / kernel time, with quartiles. GB/s: the cache bytes read (keys and
values at the attended positions) per second.

    .venv/bin/python benchmarks/bench_attention.py [--baseline 7959c6d] [--blocks 11]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's actsparse, not an installed one
from common import copies_to_exceed_cache, l3_cache_bytes, write_report  # noqa: E402

from actsparse.benchmark.timing import interleaved_blocks, paired_speedup  # noqa: E402
from actsparse.codegen.kernels.cpu import attention  # noqa: E402
from actsparse.codegen.kernels.cpu.build import build_kernel  # noqa: E402
from actsparse.codegen.kernels.cpu.probe import read_sum  # noqa: E402
from actsparse.codegen.targets import resolve_target, target_summary  # noqa: E402

KV, GROUP, HEAD_DIM, CAPACITY = 5, 3, 64, 2048
POSITIONS = (32, 512, 1024, 2000)
PREFILL_ROWS = 32
PREFILL_FIRSTS = (0, 224, 480)
RESULTS = Path(__file__).resolve().parent / "results" / "attention.json"
ROOT = Path(__file__).resolve().parents[1]
BLOCK_SECONDS = 0.02  # time one engine's block aims at


def _tensor(array):
    import tvm

    return tvm.runtime.tensor(np.ascontiguousarray(array))


def baseline_module(ref: str):
    """attention.py as it was at git revision `ref`, imported from a temporary file."""
    source = subprocess.run(["git", "show", f"{ref}:actsparse/codegen/kernels/cpu/attention.py"], cwd=ROOT,
                            capture_output=True, text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / "attention_baseline.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("attention_baseline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def cache_bytes(dtype: str, last: int) -> int:
    """Bytes of keys and values at positions 0 .. last of every kv head."""
    return 2 * KV * (last + 1) * HEAD_DIM * np.dtype(dtype).itemsize


def make_caches(dtype: str, copies: int):
    rng = np.random.default_rng(0)
    keys = [_tensor(rng.standard_normal((KV, HEAD_DIM, CAPACITY)).astype(dtype)) for _ in range(copies)]
    values = [_tensor(rng.standard_normal((KV, CAPACITY, HEAD_DIM)).astype(dtype)) for _ in range(copies)]
    return keys, values


def iters_for(call, seconds: float = BLOCK_SECONDS) -> int:
    """Calls that take about `seconds`, from a few timed ones."""
    call(0)
    start = time.perf_counter()
    for i in range(3):
        call(i)
    return max(3, int(seconds / ((time.perf_counter() - start) / 3)))


def decode_engines(modules: dict, dtype: str, position: int, caches, target) -> tuple[dict, float]:
    """{engine: call(i)} for one decode position, and the largest |output - kernel output|."""
    keys, values = caches
    copies = len(keys)
    rng = np.random.default_rng(position)
    q = _tensor(rng.standard_normal((KV, GROUP, HEAD_DIM)).astype(np.float32) / 8)
    k = _tensor(rng.standard_normal((KV, 1, HEAD_DIM)).astype(np.float32))
    v = _tensor(rng.standard_normal((KV, 1, HEAD_DIM)).astype(np.float32))
    pos = _tensor(np.array([position], np.int64))
    out = _tensor(np.zeros((KV, GROUP, HEAD_DIM), np.float32))
    engines, outputs = {}, {}
    for name, module in modules.items():
        kernel = build_kernel(module.decode_attention(KV, GROUP, HEAD_DIM, CAPACITY, cache_dtype=dtype), target).raw
        kernel(q, k, v, keys[0], values[0], pos, out)
        outputs[name] = out.numpy().copy()
        engines[name] = lambda i, kernel=kernel: kernel(q, k, v, keys[i % copies], values[i % copies], pos, out)
    size = cache_bytes(dtype, position) // 4 // 128 * 128  # floats, whole steps of both tasks
    probe = build_kernel(read_sum(size, 2), target).raw
    buffers = [_tensor(np.ones(size, np.float32)) for _ in range(copies)]
    partial = _tensor(np.zeros((2, 16), np.float32))
    engines["read_probe"] = lambda i: probe(buffers[i % copies], partial)
    diff = max(float(np.abs(o - outputs["kernel"]).max()) for o in outputs.values())
    return engines, diff


def prefill_engines(modules: dict, dtype: str, first: int, caches, target) -> tuple[dict, float]:
    """{engine: call(i)} for one prefill chunk, and the largest |output - kernel output|."""
    keys, values = caches
    copies = len(keys)
    rng = np.random.default_rng(first)
    R, heads = PREFILL_ROWS, KV * GROUP
    q = _tensor(rng.standard_normal((R, heads, HEAD_DIM)).astype(np.float32) / 8)
    k = _tensor(rng.standard_normal((R, KV, HEAD_DIM)).astype(np.float32))
    v = _tensor(rng.standard_normal((R, KV, HEAD_DIM)).astype(np.float32))
    pos = _tensor(np.array([first], np.int64))
    out = _tensor(np.zeros((R, heads, HEAD_DIM), np.float32))
    engines, outputs = {}, {}
    for name, module in modules.items():
        kernel = build_kernel(module.prefill_attention(KV, GROUP, HEAD_DIM, CAPACITY, R, cache_dtype=dtype),
                              target).raw
        kernel(q, k, v, keys[0], values[0], pos, out)
        outputs[name] = out.numpy().copy()
        engines[name] = lambda i, kernel=kernel: kernel(q, k, v, keys[i % copies], values[i % copies], pos, out)
    diff = max(float(np.abs(o - outputs["kernel"]).max()) for o in outputs.values())
    return engines, diff


def measure(engines: dict, blocks: int) -> dict[str, list[float]]:
    iters = {name: iters_for(call) for name, call in engines.items()}
    return interleaved_blocks(engines, iters, blocks)


def summarize(times: dict[str, list[float]], nbytes: int) -> dict:
    """One table row: per engine its median time, GB/s, and the paired ratios."""
    row: dict = {}
    for name, seconds in times.items():
        entry = {"us": 1e6 * float(np.median(seconds)), "us_best": 1e6 * min(seconds),
                 "gbs": nbytes / float(np.median(seconds)) / 1e9}
        if "read_probe" in times and name != "read_probe":
            entry["vs_probe"] = paired_speedup(seconds, times["read_probe"])[0]
        if "baseline" in times and name == "kernel":
            median, low, high = paired_speedup(times["baseline"], seconds)
            entry["speedup"], entry["quartiles"] = median, [low, high]
        row[name] = entry
    return row


def print_table(title: str, key: str, rows: list[dict]) -> None:
    print(f"\n### {title}\n")
    print(f"| {key} | kernel us | GB/s | x read time | baseline us | speedup [quartiles] |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        kern, base = row["kernel"], row.get("baseline")
        probe = f"{kern['vs_probe']:.2f}" if "vs_probe" in kern else "-"
        base_us = f"{base['us']:.1f}" if base else "-"
        speed = f"{kern['speedup']:.2f}x [{kern['quartiles'][0]:.2f}, {kern['quartiles'][1]:.2f}]" if base else "-"
        print(f"| {row[key]} | {kern['us']:.1f} | {kern['gbs']:.1f} | {probe} | {base_us} | {speed} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", metavar="REF", help="also time attention.py of this git revision")
    parser.add_argument("--blocks", type=int, default=11, help="interleaved rounds, one block per engine each")
    parser.add_argument("--dtypes", default="float32,float16")
    parser.add_argument("--positions", default=",".join(map(str, POSITIONS)))
    parser.add_argument("--prefill-firsts", default=",".join(map(str, PREFILL_FIRSTS)))
    parser.add_argument("--target", default="host")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    target = resolve_target(args.target)
    modules = {"kernel": attention}
    if args.baseline:
        modules["baseline"] = baseline_module(args.baseline)
    threads = os.environ.get("TVM_NUM_THREADS")
    print(f"L3 {l3_cache_bytes() >> 20} MB, target {target_summary(target)}, TVM_NUM_THREADS {threads}, "
          f"load average {os.getloadavg()[0]:.1f}")
    report = {"target": target_summary(target), "threads": threads, "blocks": args.blocks,
              "shape": {"kv_heads": KV, "group": GROUP, "head_dim": HEAD_DIM, "capacity": CAPACITY,
                        "prefill_rows": PREFILL_ROWS},
              "baseline": args.baseline, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "decode": [], "prefill": []}
    for dtype in args.dtypes.split(","):
        copies = min(128, copies_to_exceed_cache(cache_bytes(dtype, 1024)))
        caches = make_caches(dtype, copies)
        rows = []
        for position in (int(p) for p in args.positions.split(",") if p):
            engines, diff = decode_engines(modules, dtype, position, caches, target)
            row = {"dtype": dtype, "position": position, "copies": copies, "max_abs_diff": diff,
                   **summarize(measure(engines, args.blocks), cache_bytes(dtype, position))}
            rows.append(row)
        print_table(f"decode, {dtype} cache, {copies} rotating caches", "position", rows)
        report["decode"] += rows
        rows = []
        for first in (int(p) for p in args.prefill_firsts.split(",") if p):
            engines, diff = prefill_engines(modules, dtype, first, caches, target)
            row = {"dtype": dtype, "first": first, "rows": PREFILL_ROWS, "copies": copies, "max_abs_diff": diff,
                   **summarize(measure(engines, args.blocks), cache_bytes(dtype, first + PREFILL_ROWS - 1))}
            rows.append(row)
        print_table(f"prefill of {PREFILL_ROWS} rows, {dtype} cache", "first", rows)
        report["prefill"] += rows
        del caches
    write_report(args.output, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
