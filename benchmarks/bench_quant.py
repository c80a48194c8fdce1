"""Benchmark the quantized CPU kernels against onnxruntime in the same run (batch-1 GEMV).

FFN-size GEMVs (K=1024 N=2816 and K=2816 N=1024), weights rotating over several times
the L3, inputs rotating too. Engines: ORT fp32 MatMul, ORT int8 static QDQ
(MatMulIntegerToFloat after ORT's fusion), ORT int8 dynamic (DynamicQuantizeMatMul),
ORT MatMulNBits int4 (symmetric, group 128, accuracy_level 4 and 0); our fp32 dense,
int8 dense, int8 sparse-input at 50 %, int4 dense, int4 sparse-input at 50 % (on CPUs with
AVX-512 VNNI, the int8-activation kernels the compiler picks there, plus the float-activation
ones as ``*_float`` rows). Each ORT
engine is one session holding one node per weight copy (see ``common.ort_matmul_session``).

All engines of a shape are loaded at once and timed in ``--blocks`` rounds of one block each,
round-robin (``actsparse.benchmark.timing.interleaved_blocks``): the machine is shared and its bandwidth
drifts. A time is an engine's best block; a ratio is the median over rounds of the two engines'
block times in that round. Prints a markdown table (ms, ratios, GB/s of the weight bytes
actually needed) and the issue's targets; writes benchmarks/results/quant.json.

    .venv/bin/python benchmarks/bench_quant.py [--quick] [--blocks 10]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (copies_to_exceed_cache, copy_bandwidth_gbs, l3_cache_bytes, ort_matmul_session,  # noqa: E402
                    write_report)

from actsparse.benchmark.timing import interleaved_blocks  # noqa: E402
from actsparse.codegen.kernels.cpu import quant  # noqa: E402
from actsparse.codegen.kernels.cpu.build import build_kernel  # noqa: E402
from actsparse.codegen.kernels.cpu.dense import dense_matmul, pack_dense, vector_lanes  # noqa: E402
from actsparse.codegen.targets import resolve_target, target_summary  # noqa: E402
from actsparse.passes.quant_numerics import pack_matmulnbits, quantize_blockwise, quantize_per_channel  # noqa: E402

SHAPES = ((1024, 2816), (2816, 1024))
GROUP = 128
SPARSITY = 0.5
RESULTS = Path(__file__).resolve().parent / "results" / "quant.json"


def _tensor(array):
    import tvm

    return tvm.runtime.tensor(np.ascontiguousarray(array))


def _session(nodes, inits, k: int, n: int, count: int, extra_opsets=()):
    import onnxruntime as ort
    from onnx import TensorProto, helper

    inputs = [helper.make_tensor_value_info(f"x{i}", TensorProto.FLOAT, [1, k]) for i in range(count)]
    outputs = [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [1, n]) for i in range(count)]
    graph = helper.make_graph(nodes, "quantized", inputs, outputs, inits)
    opsets = [helper.make_opsetid("", 21), *[helper.make_opsetid(d, 1) for d in extra_opsets]]
    model = helper.make_model(graph, opset_imports=opsets)
    options = ort.SessionOptions()
    options.intra_op_num_threads = os.cpu_count() or 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session, [i.name for i in inputs]


def ort_int8_static_session(int8_weights, x_scale: float, k: int, n: int):
    """QDQ: DQ(Q(x)) @ DQ(W_q, s_w[N], axis=1); ORT fuses it into MatMulIntegerToFloat."""
    from onnx import helper, numpy_helper

    nodes, inits = [], [numpy_helper.from_array(np.array(x_scale, np.float32), "xs"),
                        numpy_helper.from_array(np.array(128, np.uint8), "xz")]
    for i, (q, s) in enumerate(int8_weights):
        inits += [numpy_helper.from_array(q, f"wq{i}"), numpy_helper.from_array(s, f"ws{i}"),
                  numpy_helper.from_array(np.zeros(n, np.int8), f"wz{i}")]
        nodes += [helper.make_node("QuantizeLinear", [f"x{i}", "xs", "xz"], [f"xq{i}"]),
                  helper.make_node("DequantizeLinear", [f"xq{i}", "xs", "xz"], [f"xd{i}"]),
                  helper.make_node("DequantizeLinear", [f"wq{i}", f"ws{i}", f"wz{i}"], [f"wd{i}"], axis=1),
                  helper.make_node("MatMul", [f"xd{i}", f"wd{i}"], [f"y{i}"])]
    return _session(nodes, inits, k, n, len(int8_weights))


def ort_int8_dynamic_session(int8_weights, k: int, n: int):
    """DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul (ORT: DynamicQuantizeMatMul)."""
    from onnx import TensorProto, helper, numpy_helper

    nodes, inits = [], []
    for i, (q, s) in enumerate(int8_weights):
        inits += [numpy_helper.from_array(q, f"wq{i}"), numpy_helper.from_array(s, f"ws{i}"),
                  numpy_helper.from_array(np.array(0, np.int8), f"wz{i}")]
        nodes += [helper.make_node("DynamicQuantizeLinear", [f"x{i}"], [f"xq{i}", f"xs{i}", f"xz{i}"]),
                  helper.make_node("MatMulInteger", [f"xq{i}", f"wq{i}", f"xz{i}", f"wz{i}"], [f"acc{i}"]),
                  helper.make_node("Cast", [f"acc{i}"], [f"accf{i}"], to=TensorProto.FLOAT),
                  helper.make_node("Mul", [f"xs{i}", f"ws{i}"], [f"s{i}"]),
                  helper.make_node("Mul", [f"accf{i}", f"s{i}"], [f"y{i}"])]
    return _session(nodes, inits, k, n, len(int8_weights))


def ort_matmulnbits_session(int4_weights, k: int, n: int, accuracy_level: int):
    from onnx import helper, numpy_helper

    nodes, inits = [], []
    for i, (codes, scales) in enumerate(int4_weights):
        inits += [numpy_helper.from_array(pack_matmulnbits(codes, 4, GROUP), f"b{i}"),
                  numpy_helper.from_array(scales, f"s{i}")]
        nodes.append(helper.make_node("MatMulNBits", [f"x{i}", f"b{i}", f"s{i}"], [f"y{i}"], domain="com.microsoft",
                                      K=k, N=n, bits=4, block_size=GROUP, accuracy_level=accuracy_level))
    return _session(nodes, inits, k, n, len(int4_weights), extra_opsets=("com.microsoft",))


def _threshold(x: np.ndarray, sparsity: float) -> np.ndarray:
    t = np.float32(np.quantile(np.abs(x), sparsity)) if sparsity > 0 else np.float32(-1.0)
    return np.array([t], np.float32)


class Bench:
    """All engines of one GEMV shape; ``run`` times each one once (call it once per round)."""

    def __init__(self, k: int, n: int, target, iters: int):
        self.k, self.n, self.iters = k, n, iters
        rng = np.random.default_rng(k * 7 + n)
        lanes = vector_lanes(target)
        self.copies = {"fp32": max(8, copies_to_exceed_cache(k * n * 4)),
                       "int8": copies_to_exceed_cache(k * n),
                       # sparse engines read half a copy per call: twice the copies
                       "int8_sparse": copies_to_exceed_cache(k * n // 2),
                       "int4": copies_to_exceed_cache(k * n // 2),
                       "int4_sparse": copies_to_exceed_cache(k * n // 4)}
        c8 = max(self.copies["int8"], self.copies["int8_sparse"])
        c4 = max(self.copies["int4"], self.copies["int4_sparse"])
        # Distinct float weights cost too much memory at this count: scale one base matrix per copy
        # (bytes differ after quantization rounding only in scale, which is all the kernels see).
        base = rng.standard_normal((k, n), dtype=np.float32) * 0.02
        q_base, s_base = quantize_per_channel(base)
        c_base, sc_base, _ = quantize_blockwise(base, 4, GROUP, True)
        self.inputs = [rng.standard_normal((1, k), dtype=np.float32) for _ in range(7)]
        self.x_check = self.inputs[0]
        self.base = base
        self.int8 = [(np.roll(q_base, i, axis=1), np.roll(s_base, i) * np.float32(1 + i / c8)) for i in range(c8)]
        self.int4 = [(np.roll(c_base, i, axis=0), np.roll(sc_base, i, axis=0)) for i in range(c4)]
        self.lanes, self.target = lanes, target
        self.results: dict[str, dict] = {}
        self.engines: dict[str, tuple] = {}
        self.keep: list = []  # sessions and weight copies the registered calls use
        self.block_seconds: dict[str, np.ndarray] = {}
        self.x_scale = float(max(np.abs(x).max() for x in self.inputs)) / 127.0

    def _add(self, name: str, call, iters: int, calls_per_gemv: float, nbytes: float, **extra) -> None:
        """Register an engine: ``call(i)`` runs ``1 / calls_per_gemv`` GEMVs (ORT: one per node)."""
        self.engines[name] = (call, iters, calls_per_gemv)
        self.results[name] = {"engine": name, "nbytes": nbytes, **extra}

    def _time_ort(self, name: str, session, names, nbytes: float) -> None:
        feeds = {nm: self.inputs[i % len(self.inputs)] for i, nm in enumerate(names)}
        self._add(name, lambda i: session.run(None, feeds), max(2, self.iters // len(names)), 1 / len(names), nbytes)
        self.keep.append(session)

    def _time_kernel(self, name: str, kernel, weights, extra_inputs, nbytes: float, check=None) -> None:
        xs = [_tensor(x) for x in self.inputs]
        y = _tensor(np.zeros((1, self.n), np.float32))
        c = len(weights)
        kernel(xs[0], *extra_inputs[0], *weights[0], y)
        err = check(y.numpy()) if check else None
        e = len(extra_inputs)
        self._add(name, lambda i: kernel(xs[i % len(xs)], *extra_inputs[i % e], *weights[i % c], y), self.iters, 1,
                  nbytes, **({"max_rel_err": err} if err is not None else {}))
        self.keep.append(weights)

    def measure(self, blocks: int) -> None:
        """Time every registered engine in ``blocks`` interleaved rounds (per-GEMV seconds kept)."""
        times = interleaved_blocks({name: e[0] for name, e in self.engines.items()},
                                   {name: e[1] for name, e in self.engines.items()}, blocks)
        self.block_seconds = {name: np.asarray(t) * self.engines[name][2] for name, t in times.items()}
        for name, seconds in self.block_seconds.items():
            row = self.results[name]
            row.update(ms=float(seconds.min()) * 1e3, gbs=row["nbytes"] / float(seconds.min()) / 1e9)

    def build(self) -> None:
        """Load every engine of this shape (weights, sessions) and register it for ``measure``."""
        k, n = self.k, self.n
        c8, c4 = self.copies["int8"], self.copies["int4"]
        fp32_bytes, int8_bytes = k * n * 4, k * n + n * 4
        int4_bytes = k * n // 2 + (k // GROUP) * n * 4

        # onnxruntime, one session per engine (built, timed, dropped)
        weights = [self.base * np.float32(1 + i / 100) for i in range(min(8, self.copies["fp32"]))]
        session, names = ort_matmul_session(weights)
        self._time_ort("ort_fp32", session, names, fp32_bytes)
        del session, weights
        session, names = ort_int8_static_session(self.int8[:c8], self.x_scale, k, n)
        self._time_ort("ort_int8_qdq_static", session, names, int8_bytes)
        session, names = ort_int8_dynamic_session(self.int8[:c8], k, n)
        self._time_ort("ort_int8_dynamic", session, names, int8_bytes)
        for level in (4, 0):
            session, names = ort_matmulnbits_session(self.int4[:c4], k, n, level)
            self._time_ort(f"ort_matmulnbits_int4_acc{level}", session, names, int4_bytes)
        del session

        ref = self.x_check.astype(np.float64)

        def rel(expected):
            return lambda y: float(np.abs(y - expected).max() / np.abs(expected).max())

        # ours fp32 dense
        kern = build_kernel(dense_matmul(1, k, n, lanes=self.lanes), self.target).raw
        packed = [[_tensor(pack_dense(self.base * np.float32(1 + i / 100), 2 * self.lanes))]
                  for i in range(self.copies["fp32"])]
        self._time_kernel("ours_fp32_dense", kern, packed, [[]], fp32_bytes, rel(ref @ self.base))
        del packed

        # ours int8 (weights x per-channel scale, dequantized in registers)
        q0, s0 = self.int8[0]
        w8 = q0.astype(np.float64) * s0
        kern = build_kernel(quant.int8_dense_matmul(1, k, n, lanes=self.lanes), self.target).raw
        packed = [[_tensor(a) for a in quant.pack_int8_dense(q, s, self.lanes)] for q, s in self.int8[:c8]]
        self._time_kernel("ours_int8_dense", kern, packed, [[]], int8_bytes, rel(ref @ w8))
        del packed
        kern = build_kernel(quant.int8_sparse_matmul(1, k, n, "threshold", lanes=self.lanes), self.target).raw
        packed = [[_tensor(a) for a in quant.pack_int8_sparse(q, s, self.lanes)]
                  for q, s in self.int8[:self.copies["int8_sparse"]]]
        thresholds = [[_tensor(_threshold(x, SPARSITY))] for x in self.inputs]
        x_sparse = np.where(np.abs(ref) > thresholds[0][0].numpy()[0], ref, 0)
        vnni = quant.has_int8_dot_product(self.target)
        # Where the CPU has VNNI, the compiler lowers int8 graphs with quantized activations (QDQ or
        # dynamic) at batch 1 to the VNNI kernel (x rounded to int8 per token): "ours_int8_sparse50" then.
        self._time_kernel("ours_int8_sparse50_float" if vnni else "ours_int8_sparse50", kern, packed, thresholds,
                          int8_bytes * (1 - SPARSITY), rel(x_sparse @ w8))
        del packed
        if vnni:
            kern = build_kernel(quant.int8_sparse_matmul_vnni(k, n, "threshold"), self.target).raw
            packed = [[_tensor(a) for a in quant.pack_int8_sparse_vnni(q, s)]
                      for q, s in self.int8[:self.copies["int8_sparse"]]]
            self._time_kernel("ours_int8_sparse50", kern, packed, thresholds, int8_bytes * (1 - SPARSITY),
                              rel(x_sparse @ w8))
            del packed

        # ours int4 (symmetric, group 128)
        from actsparse.passes.quant_numerics import dequantize_blockwise

        c0, sc0 = self.int4[0]
        w4 = dequantize_blockwise(c0, sc0, np.full_like(sc0, 8, np.uint8), GROUP, k).astype(np.float64)
        kern = build_kernel(quant.int4_dense_matmul(1, k, n, GROUP, lanes=self.lanes), self.target).raw
        packed = [[_tensor(a) for a in quant.pack_int4_dense(c, s, k=k, lanes=self.lanes)] for c, s in self.int4[:c4]]
        vnni = quant.has_int8_dot_product(self.target)
        # The compiler takes the VNNI kernel (x rounded to int8 per group, like MatMulNBits at
        # accuracy_level 4) where the CPU has it: that one is "ours_int4_dense" then.
        self._time_kernel("ours_int4_dense_float" if vnni else "ours_int4_dense", kern, packed, [[]], int4_bytes,
                          rel(ref @ w4))
        del packed
        if vnni:
            kern = build_kernel(quant.int4_dense_matmul_vnni(1, k, n, GROUP), self.target).raw
            packed = [[_tensor(a) for a in quant.pack_int4_dense_vnni(c, s, k=k, group=GROUP)] for c, s in self.int4[:c4]]
            self._time_kernel("ours_int4_dense", kern, packed, [[]], int4_bytes, rel(ref @ w4))
            del packed
        kern = build_kernel(quant.int4_sparse_matmul(1, k, n, GROUP, "threshold", lanes=self.lanes), self.target).raw
        packed = [[_tensor(a) for a in quant.pack_int4_sparse(c, s, k=k, lanes=self.lanes)]
                  for c, s in self.int4[:self.copies["int4_sparse"]]]
        # as int4 dense: with VNNI the compiler takes the kernel that rounds x to int8 per group
        self._time_kernel("ours_int4_sparse50_float" if vnni else "ours_int4_sparse50", kern, packed, thresholds,
                          int4_bytes * (1 - SPARSITY), rel(x_sparse @ w4))
        del packed
        if vnni:
            kern = build_kernel(quant.int4_sparse_matmul_vnni(k, n, GROUP, "threshold"), self.target).raw
            packed = [[_tensor(a) for a in quant.pack_int4_sparse_vnni(c, s, k=k)]
                      for c, s in self.int4[:self.copies["int4_sparse"]]]
            self._time_kernel("ours_int4_sparse50", kern, packed, thresholds, int4_bytes * (1 - SPARSITY),
                              rel(x_sparse @ w4))
            del packed

    def summary(self) -> dict:
        b = self.block_seconds
        references = {"vs_ort_fp32": b["ort_fp32"],
                      "vs_ort_int8_best": np.minimum(b["ort_int8_qdq_static"], b["ort_int8_dynamic"]),
                      "vs_ort_int4_best": np.minimum(b["ort_matmulnbits_int4_acc4"], b["ort_matmulnbits_int4_acc0"]),
                      "vs_ours_fp32": b["ours_fp32_dense"]}

        def speed(reference, engine: str) -> float:  # median over rounds of the same-round ratio
            return float(np.median(reference / b[engine]))

        for name, row in self.results.items():
            row.update({key: speed(reference, name) for key, reference in references.items()})
        targets = [
            ("int8 dense >= 1.0x ORT int8 (faster of static/dynamic)", speed(references["vs_ort_int8_best"], "ours_int8_dense"), 1.0),
            ("int8 dense >= 2.5x our fp32", speed(b["ours_fp32_dense"], "ours_int8_dense"), 2.5),
            ("int8 + 50% sparsity >= 1.6x ORT int8", speed(references["vs_ort_int8_best"], "ours_int8_sparse50"), 1.6),
            ("int8 + 50% sparsity >= 5x ORT fp32", speed(b["ort_fp32"], "ours_int8_sparse50"), 5.0),
            ("int4 dense >= 1.0x ORT MatMulNBits (faster level)", speed(references["vs_ort_int4_best"], "ours_int4_dense"), 1.0),
            ("int4 + 50% sparsity >= 1.6x ORT MatMulNBits (faster level)",
             speed(references["vs_ort_int4_best"], "ours_int4_sparse50"), 1.6),
        ]
        return {"shape": {"k": self.k, "n": self.n}, "weight_copies": self.copies, "group": GROUP,
                "sparsity": SPARSITY, "rows": list(self.results.values()),
                "targets": [{"target": t, "ratio": v, "needed": need, "met": v >= need} for t, v, need in targets]}


def _print(summary: dict, bandwidth: float) -> None:
    s = summary["shape"]
    print(f"\n### GEMV K={s['k']} N={s['n']} (batch 1)\n")
    print("| engine | ms (best block) | vs ORT fp32 | vs ORT int8 | vs ORT int4 | vs our fp32 | GB/s | % copy bw |")
    print("|---|---|---|---|---|---|---|---|")
    for row in summary["rows"]:
        print(f"| {row['engine']} | {row['ms']:.3f} | {row['vs_ort_fp32']:.2f} | {row['vs_ort_int8_best']:.2f} | "
              f"{row['vs_ort_int4_best']:.2f} | {row['vs_ours_fp32']:.2f} | {row['gbs']:.1f} | "
              f"{100 * row['gbs'] / bandwidth:.0f} |")
    print()
    for t in summary["targets"]:
        print(f"- {'MET' if t['met'] else 'missed'}: {t['target']}: {t['ratio']:.2f}x")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer iterations")
    parser.add_argument("--blocks", type=int, default=10, help="interleaved rounds, one block per engine each")
    parser.add_argument("--target", default="host")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    target = resolve_target(args.target)
    iters = 30 if args.quick else 100
    bandwidth = copy_bandwidth_gbs()
    print(f"copy-probe bandwidth {bandwidth:.1f} GB/s, L3 {l3_cache_bytes() >> 20} MB, target {target_summary(target)}, "
          f"load average {os.getloadavg()[0]:.1f}")
    summaries = []
    for k, n in SHAPES:  # one shape at a time: all its engines and weight copies loaded together
        bench = Bench(k, n, target, iters)
        bench.build()
        bench.measure(args.blocks)
        summaries.append(bench.summary())
        del bench
    bandwidth = max(bandwidth, copy_bandwidth_gbs())
    report = {
        "machine": {"cpus": os.cpu_count(), "arch": platform.machine(), "l3_bytes": l3_cache_bytes(),
                    "copy_bandwidth_gbs": bandwidth, "load_average": os.getloadavg()[0]},
        "target": target_summary(target), "blocks": args.blocks,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "gemv": summaries,
    }
    for summary in report["gemv"]:
        _print(summary, bandwidth)
    write_report(args.output, report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
