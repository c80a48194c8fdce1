"""Time the int8 prompt-chunk kernels at M=32 rows against the batch-1 VNNI kernel called 32 times.

A causal LM's prompt runs in chunks of 32 tokens (docs/generation.md). For int8 + a sparsifier on
an AVX-512 VNNI CPU the decode step's kernel is ``int8_sparse_matmul_vnni`` (one row); this
compares, per chunk of 32 rows and per FFN-size shape (K=2816 N=1024, K=1024 N=2816), weights
rotating over several times the L3:

  vnni_rows_m32       int8_vnni_rows_matmul: one call, x rounded to int8 per row, the VNNI layout
  vnni_one_row_x32    int8_sparse_matmul_vnni (TEAL threshold at 50 %) called 32 times, as the
                      prompt ran token by token before; each call on the next weight copy
  float_nonzero_m8_x4 int8_sparse_matmul(m=8, mode nonzero) four times over the K-major int8 layout:
                      float activations x the int8 codes, as the other int8 sparse-layout chunks run
  int8_dense_m32      int8_dense_matmul(m=32) over column panels (a plain int8 model's chunk)

Engines are timed in interleaved rounds (``actsparse.benchmark.timing.interleaved_blocks``); a
time is an engine's best block, a ratio the median over rounds of same-round ratios (with the
quartiles). ``max_rel_err``: max |y - x @ W| / max |x @ W| against float64 with the dequantized
weights (the cost of each engine's activation arithmetic; the one-row row is at 50 % sparsity).

    .venv/bin/python benchmarks/bench_quant_chunk.py [--blocks 10]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import copies_to_exceed_cache, l3_cache_bytes, write_report  # noqa: E402

from actsparse.benchmark.timing import interleaved_blocks, paired_speedup  # noqa: E402
from actsparse.codegen.kernels.cpu import quant  # noqa: E402
from actsparse.codegen.kernels.cpu.build import build_kernel  # noqa: E402
from actsparse.codegen.targets import resolve_target, target_summary  # noqa: E402
from actsparse.passes.quant_numerics import quantize_per_channel  # noqa: E402

SHAPES = ((2816, 1024), (1024, 2816))
ROWS = 32
SPARSITY = 0.5
RESULTS = Path(__file__).resolve().parent / "results" / "quant_chunk.json"
REFERENCE = "vnni_one_row_x32"
FLOAT_DENSE = "int8_dense_m32"


def _tensor(array):
    import tvm

    return tvm.runtime.tensor(np.ascontiguousarray(array))


def _rel_err(y: np.ndarray, exact: np.ndarray) -> float:
    return float(np.abs(y - exact).max() / np.abs(exact).max())


def shape_engines(k: int, n: int, target) -> tuple[dict, dict, dict]:
    """(engines: name -> call(i), chunk calls per engine, max_rel_err per engine) for one shape."""
    rng = np.random.default_rng(k + n)
    q, s = quantize_per_channel(rng.standard_normal((k, n), dtype=np.float32) * 0.02)
    copies = copies_to_exceed_cache(k * n)
    # the copies differ by a column roll and their scales: all the kernels see
    weights = [(np.roll(q, i, axis=1), np.roll(s, i) * np.float32(1 + i / copies)) for i in range(copies)]
    x = rng.standard_normal((ROWS, k), dtype=np.float32)
    threshold = np.array([np.quantile(np.abs(x), SPARSITY)], np.float32)
    exact = x.astype(np.float64) @ (q.astype(np.float64) * s)
    sparse_exact = np.where(np.abs(x) > threshold, x, 0).astype(np.float64) @ (q.astype(np.float64) * s)
    y = _tensor(np.zeros((ROWS, n), np.float32))
    y_row, y8 = _tensor(np.zeros((1, n), np.float32)), _tensor(np.zeros((8, n), np.float32))
    xs, rows = _tensor(x), [_tensor(x[i: i + 1]) for i in range(ROWS)]
    eights = [_tensor(x[i: i + 8]) for i in range(0, ROWS, 8)]
    t = _tensor(threshold)
    vnni = [[_tensor(a) for a in quant.pack_int8_sparse_vnni(*w)] for w in weights]
    kmajor = [[_tensor(a) for a in quant.pack_int8_sparse(*w)] for w in weights]
    panels = [[_tensor(a) for a in quant.pack_int8_dense(*w)] for w in weights]
    rows_kernel = build_kernel(quant.int8_vnni_rows_matmul(ROWS, k, n), target).raw
    one_row = build_kernel(quant.int8_sparse_matmul_vnni(k, n, "threshold"), target).raw
    float_rows = build_kernel(quant.int8_sparse_matmul(8, k, n, "nonzero"), target).raw
    dense_rows = build_kernel(quant.int8_dense_matmul(ROWS, k, n), target).raw

    def vnni_rows(i):
        rows_kernel(xs, *vnni[i % copies], y)

    def vnni_one_row_x32(i):
        for r in range(ROWS):
            one_row(rows[r], t, *vnni[(i * ROWS + r) % copies], y_row)

    def float_nonzero_m8_x4(i):
        for part in eights:
            float_rows(part, *kmajor[i % copies], y8)

    def int8_dense_m32(i):
        dense_rows(xs, *panels[i % copies], y)

    errors = {}
    vnni_rows(0)
    errors["vnni_rows_m32"] = _rel_err(y.numpy(), exact)
    one_row(rows[0], t, *vnni[0], y_row)
    errors[REFERENCE] = _rel_err(y_row.numpy()[0], sparse_exact[0])
    parts = []
    for part in eights:
        float_rows(part, *kmajor[0], y8)
        parts.append(y8.numpy())
    errors["float_nonzero_m8_x4"] = _rel_err(np.concatenate(parts), exact)
    int8_dense_m32(0)
    errors["int8_dense_m32"] = _rel_err(y.numpy(), exact)
    engines = {"vnni_rows_m32": vnni_rows, REFERENCE: vnni_one_row_x32, "float_nonzero_m8_x4": float_nonzero_m8_x4,
               "int8_dense_m32": int8_dense_m32}
    return engines, {"copies": copies}, errors


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=10, help="interleaved rounds, one block per engine each")
    parser.add_argument("--iters", type=int, default=10, help="chunks per block")
    parser.add_argument("--target", default="host")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    target = resolve_target(args.target)
    if not quant.has_int8_dot_product(target):
        print("this target has no AVX-512 VNNI: nothing to compare", file=sys.stderr)
        return 2
    print(f"L3 {l3_cache_bytes() >> 20} MB, target {target_summary(target)}, load average {os.getloadavg()[0]:.1f}")
    report = {"target": target_summary(target), "rows": ROWS, "sparsity_one_row": SPARSITY, "blocks": args.blocks,
              "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "shapes": []}
    for k, n in SHAPES:
        engines, info, errors = shape_engines(k, n, target)
        times = interleaved_blocks(engines, {name: args.iters for name in engines}, args.blocks)
        print(f"\n### K={k} N={n}, {ROWS} rows, {info['copies']} weight copies\n")
        print(f"| engine | ms per chunk (best block) | vs {REFERENCE} (median [quartiles]) | vs {FLOAT_DENSE} | "
              "max_rel_err |")
        print("|---|---|---|---|---|")
        rows = []
        for name, seconds in times.items():
            median, low, high = paired_speedup(times[REFERENCE], seconds)
            vs_float = paired_speedup(times[FLOAT_DENSE], seconds)[0]
            rows.append({"engine": name, "ms": 1e3 * min(seconds), "speedup": median, "quartiles": [low, high],
                         f"vs_{FLOAT_DENSE}": vs_float, "max_rel_err": errors[name]})
            print(f"| {name} | {1e3 * min(seconds):.3f} | {median:.2f}x [{low:.2f}, {high:.2f}] | {vs_float:.2f}x | "
                  f"{errors[name]:.1e} |")
        report["shapes"].append({"k": k, "n": n, **info, "engines": rows})
        del engines
    write_report(args.output, report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
