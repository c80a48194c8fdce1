"""Predicted-neuron FFN (predictor + ffn_indexed) vs the dense FFN, batch-1 decode, one run.

Llama-style SwiGLU layers (D=1024, F=2816 by default; ReLU-family after relufy), a stack of
--layers layers (output of one is the input of the next). Engines, on the same rotating inputs:

  onnxruntime dense      one session running the dense stack (weights of all layers >= 4x L3)
  indexed, all neurons   ffn_indexed with every neuron active (the kernel's own dense speed)
  predicted              per layer: the low-rank predictor in numpy ((x @ A) @ B + b, rank r,
                         its weights read too), the `active` fraction of neurons with the largest
                         logits, then ffn_indexed on them; rotating over enough weight copies that
                         the bytes actually read are >= 4x the L3

`--active` defaults to the predicted-active fraction the predictor pass reached on the relufied
LM (benchmarks/results/lm_small.json, threshold mode), whose end perplexity is reported alongside.

Then the compiled end-to-end path (`"compiled"` in the JSON), at `--active` and at each of
`--compiled-actives` (default: the LM's fraction and 0.30), all engines on the same inputs:

  (the compiled path's stack has residual adds, h += FFN(h), as in Llama)
  compiled predicted     actsparse.compile of the ReLU stack with a PredictActive op per layer (the
                         predictor pass's graph; random rank-r predictor, its threshold set per layer
                         for the wanted active fraction on calibration inputs): predict_active +
                         ffn_indexed per layer
  compiled dense         the same weights as a SwiGLU stack (silu: nothing to skip), compiled:
                         three dense kernels per layer
  onnxruntime dense      the ReLU stack without predictor (one session)
  onnxruntime predicted  the predicted ONNX (ORT computes every neuron, then masks)

Each compiled artifact is loaded several times (separate weight memory) and the calls rotate over
the copies, so the bytes a call reads are >= 4x the L3 over a rotation.
Times are the best block of several (the 2 cores are shared); only ratios within this run mean
anything. Writes benchmarks/results/lm_predictor_bench.json.

    .venv/bin/python benchmarks/bench_predictor.py [--active 0.25] [--rank 128] [--layers 4] [--skip-direct]
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import sys
from pathlib import Path

# The predictor's small GEMVs run in numpy between kernel calls: one BLAS thread, or its threads
# fight TVM's spinning thread pool for the 2 cores (measured: the predicted path got 3x slower).
for _name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_name, "1")

import numpy as np  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
BENCH_INPUTS = 7
MEMORY_BUDGET = 2_000_000_000


def lm_predictor_result(path: Path = RESULTS / "lm_small.json") -> dict | None:
    """The predictor's numbers on the relufied LM (examples/lm_sparsity.py), if they exist."""
    data = json.loads(path.read_text()) if path.exists() else {}
    if "predictor" not in data:
        return None
    fields = ("predicted_active_mean", "recall_mean", "perplexity", "change_vs_relufied")
    return {"file": str(path.relative_to(RESULTS.parents[1])) if path.is_relative_to(RESULTS.parents[1]) else str(path),
            "base_perplexity": data.get("eval", {}).get("onnx_perplexity"),
            "relufied_perplexity": data["predictor"].get("relufied_perplexity"),
            "modes": {name: {f: row.get(f) for f in fields} for name, row in data["predictor"]["modes"].items()}}


def stack_proto(weights, residual: bool = False):
    """The dense stack in ONNX: h = down(relu(h @ Wg) * (h @ Wu)) per layer (`residual`: h += ...)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    d = weights[0][0].shape[0]
    nodes, inits, h = [], [], "x"
    for i, (wg, wu, wd) in enumerate(weights):
        inits += [numpy_helper.from_array(w, f"w{n}{i}") for n, w in (("g", wg), ("u", wu), ("d", wd))]
        nodes += [helper.make_node("MatMul", [h, f"wg{i}"], [f"g{i}"]),
                  helper.make_node("Relu", [f"g{i}"], [f"a{i}"]),
                  helper.make_node("MatMul", [h, f"wu{i}"], [f"u{i}"]),
                  helper.make_node("Mul", [f"a{i}", f"u{i}"], [f"h{i}"]),
                  helper.make_node("MatMul", [f"h{i}", f"wd{i}"], [f"y{i}"])]
        h = f"y{i}"
        if residual:
            nodes.append(helper.make_node("Add", [f"r{i - 1}" if i else "x", h], [f"r{i}"]))
            h = f"r{i}"
    graph = helper.make_graph(nodes, "stack", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, d])],
                              [helper.make_tensor_value_info(h, TensorProto.FLOAT, [1, d])], inits)
    return onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def reference(x, weights, predictors, nnz):
    """numpy: each layer computes only its predicted neurons (the same selection as the kernel path)."""
    for (wg, wu, wd), (a, b, bias) in zip(weights, predictors):
        idx = predicted_indices(x, a, b, bias, nnz)
        h = np.zeros((1, wg.shape[1]), np.float32)
        h[0, idx] = np.maximum(x @ wg[:, idx], 0)[0] * (x @ wu[:, idx])[0]
        x = h @ wd
    return x


def predicted_indices(x, a, b, bias, nnz):
    logits = (x @ a) @ b + bias
    return np.argpartition(-logits[0], nnz - 1)[:nnz].astype(np.int32)


def coprime_prefix(inputs: list, copies: int) -> list:
    """The first n inputs with n coprime to `copies`: every weight copy sees every input."""
    n = len(inputs)
    while n > 1 and math.gcd(n, copies) != 1:
        n -= 1
    return inputs[:n]


def random_stack(d: int, f: int, layers: int, rank: int):
    """(rng, FFN weights (Wg, Wu, Wd) per layer, predictors (A, B, bias) per layer, rotating inputs),
    seeded: both benchmarks here run the same stack; the rng goes on for more samples."""
    rng = np.random.default_rng(0)
    weights = [tuple((rng.standard_normal(shape) / math.sqrt(shape[0])).astype(np.float32)
                     for shape in ((d, f), (d, f), (f, d))) for _ in range(layers)]
    predictors = [((rng.standard_normal((d, rank)) / math.sqrt(d)).astype(np.float32),
                   (rng.standard_normal((rank, f)) / math.sqrt(rank)).astype(np.float32),
                   np.zeros(f, np.float32)) for _ in range(layers)]
    inputs = [rng.standard_normal((1, d)).astype(np.float32) for _ in range(BENCH_INPUTS)]
    return rng, weights, predictors, inputs


def run(d: int, f: int, layers: int, active: float, rank: int, iters: int) -> dict:
    import onnxruntime as ort
    import tvm

    from actsparse.benchmark.timing import copy_bandwidth_gbs, l3_cache_bytes, time_per_call
    from actsparse.codegen.kernels.cpu.build import aligned_array, build_kernel
    from actsparse.codegen.kernels.cpu.ffn import ffn_indexed, pack_ffn_indexed

    _, weights, predictors, inputs = random_stack(d, f, layers, rank)
    layer_bytes = 3 * d * f * 4
    predictor_bytes = (d * rank + rank * f + f) * 4
    nnz = max(1, int(round(active * f)))
    l3 = l3_cache_bytes()
    report = {"d": d, "f": f, "layers": layers, "active": active, "nnz": nnz, "rank": rank,
              "dense_weight_bytes": layer_bytes * layers, "l3_bytes": l3,
              "bytes_fraction_predicted": round((nnz / f * layer_bytes + predictor_bytes) / layer_bytes, 4),
              "machine": platform.processor() or platform.machine(),
              "copy_bandwidth_gbs": round(copy_bandwidth_gbs(), 2)}
    print(f"D={d} F={f} x{layers} layers ({layer_bytes * layers / 1e6:.0f} MB), active {active:.3f} "
          f"(nnz {nnz}), predictor rank {rank}, L3 {l3 >> 20} MB", flush=True)

    # onnxruntime dense: the stack's weights are >= 4x L3 by themselves (checked)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(stack_proto(weights).SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    ort_seconds = time_per_call(lambda i: session.run(None, {"x": inputs[i % len(inputs)]}), iters)
    dense_out = session.run(None, {"x": inputs[0]})[0]
    del session
    gc.collect()

    kernel = build_kernel(ffn_indexed(d, f, "relu"), "host").raw

    def time_indexed(fraction: float, with_predictor: bool, count: int) -> tuple[float, int, np.ndarray]:
        per_copy = (fraction * layer_bytes + (predictor_bytes if with_predictor else 0)) * layers
        copies = max(1, min(math.ceil(4 * l3 / per_copy), MEMORY_BUDGET // (layer_bytes * layers)))
        packed = [[tvm.runtime.tensor(aligned_array(p)) for p in pack_ffn_indexed(*w)] for w in weights]
        sets = [packed] + [[[tvm.runtime.tensor(aligned_array(p)) for p in pack_ffn_indexed(*w)] for w in weights]
                           for _ in range(copies - 1)]
        preds = [[tuple(np.array(p) for p in pr) for pr in predictors] for _ in range(copies)]
        all_idx = tvm.runtime.tensor(np.arange(f, dtype=np.int32))
        nnz_tensor = tvm.runtime.tensor(np.array([count], np.int32))
        xs = coprime_prefix(inputs, copies)
        outs = [tvm.runtime.tensor(np.zeros((1, d), np.float32)) for _ in range(layers)]
        idx_buffer = np.zeros(f, np.int32)
        idx_tensor = tvm.runtime.tensor(idx_buffer)

        def call(i):
            x = xs[i % len(xs)]
            current = tvm.runtime.tensor(aligned_array(x))
            weight_set, pred_set = sets[i % copies], preds[i % copies]
            for layer in range(layers):
                if with_predictor:
                    a, b, bias = pred_set[layer]
                    host = x if layer == 0 else outs[layer - 1].numpy()
                    idx_buffer[:count] = predicted_indices(host, a, b, bias, count)  # entries past nnz unused
                    idx = idx_tensor.copyfrom(idx_buffer)
                else:
                    idx = all_idx
                kernel(current, idx, nnz_tensor, *weight_set[layer], outs[layer])
                current = outs[layer]

        seconds = time_per_call(call, iters)
        call(0)
        out = outs[-1].numpy()
        del sets
        gc.collect()
        return seconds, copies, out

    all_seconds, all_copies, all_out = time_indexed(1.0, False, f)
    pred_seconds, pred_copies, pred_out = time_indexed(active, True, nnz)
    ref = reference(inputs[0], weights, predictors, nnz)
    report["engines"] = {
        "onnxruntime dense": {"ms": round(ort_seconds * 1e3, 4)},
        "ffn_indexed, all neurons": {"ms": round(all_seconds * 1e3, 4), "copies": all_copies,
                                     "max_abs_error": float(np.abs(all_out - dense_out).max())},
        "predictor + ffn_indexed": {"ms": round(pred_seconds * 1e3, 4), "copies": pred_copies,
                                    "max_abs_error": float(np.abs(pred_out - ref).max())},
    }
    report["speedup_vs_onnxruntime_dense"] = round(ort_seconds / pred_seconds, 3)
    report["speedup_vs_indexed_all"] = round(all_seconds / pred_seconds, 3)
    report["ideal_speedup"] = round(1 / report["bytes_fraction_predicted"], 3)
    report["target_met"] = report["speedup_vs_onnxruntime_dense"] >= 3.0
    for name, row in report["engines"].items():
        print(f"  {name:28s} {row['ms']:9.3f} ms", flush=True)
    print(f"  speed-up vs onnxruntime dense {report['speedup_vs_onnxruntime_dense']:.2f}x "
          f"(ideal from bytes {report['ideal_speedup']:.2f}x), vs indexed-all {report['speedup_vs_indexed_all']:.2f}x")
    return report


def predicted_stack(weights, predictors, active: float, calibration: list[np.ndarray]):
    """The ReLU stack with the predictor pass's PredictActive op inserted per layer (an onnx_ir model);
    each layer's threshold is the (1 - active) quantile of its logits over the calibration inputs."""
    import onnx_ir as ir

    from actsparse.ir.blocks import find_blocks
    from actsparse.passes.predictor import _insert

    model = ir.serde.deserialize_model(stack_proto(weights, residual=True))
    blocks = find_blocks(model).ffn
    if len(blocks) != len(weights):
        raise RuntimeError(f"found {len(blocks)} FFN blocks in the {len(weights)}-layer stack")
    xs = np.concatenate(calibration)
    thresholds = []
    for block, (wg, wu, wd), (a, b, bias) in zip(blocks, weights, predictors):
        logits = (xs @ a) @ b + bias
        threshold = float(np.quantile(logits, 1.0 - active))
        thresholds.append(threshold)
        _insert(model, block, a, b, bias, "threshold", threshold)
        xs = xs + (np.maximum(xs @ wg, 0) * (xs @ wu) * (logits > threshold)) @ wd
    return model, thresholds


def silu_stack_proto(weights):
    """The same weights as a SwiGLU stack: silu(h @ Wg) * (h @ Wu) -> down, dense everywhere."""
    proto = stack_proto(weights, residual=True)
    from onnx import helper

    nodes = []
    for node in proto.graph.node:
        if node.op_type == "Relu":
            sig = node.output[0] + "_sigmoid"
            nodes += [helper.make_node("Sigmoid", [node.input[0]], [sig]),
                      helper.make_node("Mul", [node.input[0], sig], [node.output[0]])]
        else:
            nodes.append(node)
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    return proto


def run_compiled(d: int, f: int, layers: int, actives: list[float], rank: int, iters: int) -> dict:
    """Compiled predicted FFN vs compiled dense FFN vs onnxruntime dense, same weights and inputs."""
    import tempfile

    import onnx_ir as ir
    import onnxruntime as ort

    import actsparse
    from actsparse.benchmark.timing import l3_cache_bytes, time_per_call
    from actsparse.codegen.compile import compile_model

    rng, weights, predictors, inputs = random_stack(d, f, layers, rank)
    calibration = [rng.standard_normal((1, d)).astype(np.float32) for _ in range(64)]
    l3 = l3_cache_bytes()
    layer_bytes, predictor_bytes = 3 * d * f * 4, (d * rank + rank * f + f) * 4
    workdir = Path(tempfile.mkdtemp(prefix="bench-predictor-"))
    options = ort.SessionOptions()
    options.log_severity_level = 3

    def ort_time(proto) -> tuple[float, np.ndarray]:
        session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
        seconds = time_per_call(lambda i: session.run(None, {"x": inputs[i % len(inputs)]}), iters)
        return seconds, session.run(None, {"x": inputs[0]})[0]

    def compiled_time(model, name: str, bytes_per_call: float) -> tuple[float, int, np.ndarray, list]:
        result = compile_model(model, "host", workdir / name / "model.actsparse", input_shapes={"x": (1, d)})
        copies = max(1, min(math.ceil(4 * l3 / bytes_per_call), MEMORY_BUDGET // (layer_bytes * layers)))
        loaded = [actsparse.load(result.path) for _ in range(copies)]
        xs = coprime_prefix(inputs, copies)
        seconds = time_per_call(lambda i: loaded[i % copies].run(x=xs[i % len(xs)]), iters)
        out = next(iter(loaded[0].run(x=inputs[0]).values()))
        del loaded
        gc.collect()
        return seconds, copies, out, result.kernels

    dense_seconds, dense_copies, dense_out, dense_plan = compiled_time(
        ir.serde.deserialize_model(silu_stack_proto(weights)), "dense", layer_bytes * layers)
    ort_dense_seconds, _ = ort_time(stack_proto(weights, residual=True))
    report = {"d": d, "f": f, "layers": layers, "rank": rank, "l3_bytes": l3, "runs": [],
              "compiled dense": {"ms": round(dense_seconds * 1e3, 4), "copies": dense_copies,
                                 "kernels": sorted({e["kernel"] for e in dense_plan})},
              "onnxruntime dense": {"ms": round(ort_dense_seconds * 1e3, 4)}}
    print(f"compiled: D={d} F={f} x{layers}, rank {rank}; compiled dense {dense_seconds * 1e3:.3f} ms, "
          f"onnxruntime dense {ort_dense_seconds * 1e3:.3f} ms", flush=True)
    for active in actives:
        model, thresholds = predicted_stack(weights, predictors, active, calibration)
        proto = ir.serde.serialize_model(model)
        per_call = (active * layer_bytes + predictor_bytes) * layers
        seconds, copies, out, plan = compiled_time(model, f"predicted_{active:.3f}", per_call)
        ort_pred_seconds, ort_pred_out = ort_time(proto)
        # the same artifact again, timed right after, so drift between blocks shows in the ratio
        dense_again, _, _, _ = compiled_time(ir.serde.deserialize_model(silu_stack_proto(weights)), "dense_again",
                                             layer_bytes * layers)
        row = {"active": active, "thresholds": [round(t, 4) for t in thresholds],
               "kernels": sorted({e["kernel"] for e in plan}),
               "compiled predicted": {"ms": round(seconds * 1e3, 4), "copies": copies,
                                      "max_abs_error_vs_onnxruntime": float(np.abs(out - ort_pred_out).max())},
               "onnxruntime predicted": {"ms": round(ort_pred_seconds * 1e3, 4)},
               "compiled dense, timed again": {"ms": round(dense_again * 1e3, 4)},
               "bytes_fraction": round(per_call / (layer_bytes * layers), 4)}
        best_dense = min(dense_seconds, dense_again)
        row["speedup_vs_compiled_dense"] = round(best_dense / seconds, 3)
        row["speedup_vs_onnxruntime_dense"] = round(ort_dense_seconds / seconds, 3)
        row["ideal_speedup_from_bytes"] = round(1 / row["bytes_fraction"], 3)
        row["target_met"] = row["speedup_vs_compiled_dense"] >= 3.0
        report["runs"].append(row)
        print(f"  active {active:.3f}: compiled predicted {seconds * 1e3:.3f} ms ({copies} copies, "
              f"max err vs ORT {row['compiled predicted']['max_abs_error_vs_onnxruntime']:.1e}), "
              f"ORT predicted ONNX {ort_pred_seconds * 1e3:.3f} ms, compiled dense again {dense_again * 1e3:.3f} ms; "
              f"{row['speedup_vs_compiled_dense']:.2f}x vs compiled dense (best), "
              f"{row['speedup_vs_onnxruntime_dense']:.2f}x vs ORT dense (ideal {row['ideal_speedup_from_bytes']:.2f}x)",
              flush=True)
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=int, default=1024)
    parser.add_argument("--f", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--active", type=float, default=None, help="default: the LM predictor's predicted-active")
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--compiled-actives", type=float, nargs="*", default=None,
                        help="active fractions of the compiled path (default: --active and 0.30)")
    parser.add_argument("--skip-direct", action="store_true", help="only the compiled end-to-end path")
    parser.add_argument("--lm", default=str(RESULTS / "lm_small.json"),
                        help="examples/lm_sparsity.py results whose predictor sets --active (lm_mini.json: the mini LM)")
    parser.add_argument("--out", default=str(RESULTS / "lm_predictor_bench.json"))
    args = parser.parse_args(argv)
    lm = lm_predictor_result(Path(args.lm).resolve())
    active = args.active
    if active is None:
        active = lm["modes"]["threshold r95"]["predicted_active_mean"] if lm else 0.3
    report = {} if args.skip_direct else run(args.d, args.f, args.layers, active, args.rank, args.iters)
    actives = args.compiled_actives if args.compiled_actives is not None else sorted({active, 0.3})
    report["compiled"] = run_compiled(args.d, args.f, args.layers, actives, args.rank, args.iters)
    report["lm"] = lm
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
