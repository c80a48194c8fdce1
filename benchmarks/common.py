"""Shared benchmark helpers: memory-bandwidth probe, timing, machine facts, ORT baselines.

Figures from these shared machines drift; only ratios measured in the same run mean
anything. Weights must rotate over several times the last-level cache.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from actsparse.atomic import write_json_atomic
from actsparse.benchmark.timing import copies_to_exceed_cache, copy_bandwidth_gbs, l3_cache_bytes, time_per_call  # noqa: F401


def ort_matmul_session(weights: list[np.ndarray], threads: int | None = None):
    """One onnxruntime session holding one MatMul node per weight matrix (x @ W_i).

    One session with many nodes, not many sessions: several sessions spinning their
    thread pools on 2 cores were 4x slower in our measurements. Returns (session,
    input names); one ``session.run`` runs every node, so time per MatMul is the run
    time divided by ``len(weights)``.
    """
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    k, n = weights[0].shape
    inputs = [helper.make_tensor_value_info(f"x{i}", TensorProto.FLOAT, [1, k]) for i in range(len(weights))]
    outputs = [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, [1, n]) for i in range(len(weights))]
    inits = [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(weights)]
    nodes = [helper.make_node("MatMul", [f"x{i}", f"w{i}"], [f"y{i}"]) for i in range(len(weights))]
    graph = helper.make_graph(nodes, "matmuls", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or os.cpu_count() or 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session, [i.name for i in inputs]


def read_bound_call(weight_bytes: int):
    """A call reading ``weight_bytes`` with the read probe (``kernels/cpu/probe.read_sum``): how
    fast this machine reads that many bytes, for the dense engines to be measured against."""
    import tvm

    from actsparse.codegen.kernels.cpu.build import build_kernel
    from actsparse.codegen.kernels.cpu.probe import STEP, read_sum
    from actsparse.codegen.targets import resolve_target

    tasks = os.cpu_count() or 1
    size = weight_bytes // 4 // (tasks * STEP) * (tasks * STEP)
    kernel = build_kernel(read_sum(size, tasks), resolve_target("host")).raw
    data = tvm.runtime.tensor(np.ones(size, np.float32))
    partial = tvm.runtime.tensor(np.zeros((tasks, 16), np.float32))
    return lambda i: kernel(data, partial)


def write_report(path: Path, report: dict) -> None:
    """A benchmark's JSON report at ``path`` (folders made, written to a temp file and renamed)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, report)
    print(f"\nwrote {path}")
