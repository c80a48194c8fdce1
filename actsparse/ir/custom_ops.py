"""Ops of domain `actsparse` (version 1). Each carries an ONNX-function body, so
onnxruntime and onnx.checker accept a model that uses them; codegen lowers them to kernels.

- `Sparsify(x, threshold) -> y`: y = x where |x| > threshold, else 0 (TEAL, CATS).
- `SparsifyWeighted(x, threshold, channel_scale) -> y`: y = x where |x| * scale > threshold,
  else 0; `channel_scale[k]` is the norm of the weight row that input channel k reads (WINA).
- `CachedAttention(q, k, v, past_k, past_v) -> (out, present_k, present_v)`: one decode step of
  causal attention over a KV cache. q [kv_heads, group, head_dim] (already scaled), k and v
  [kv_heads, 1, head_dim], past_* [kv_heads, past, head_dim]; present_* = past_* with k / v
  appended; out = softmax(q present_kᵀ) present_v. The compiled form keeps the cache as runtime
  state instead (codegen/kv_cache.py).
- `RankSparseMatMul(x, threshold, channel_scale, weight, lowrank_in, lowrank_out) -> y` (R-Sparse):
  keep = |x| * channel_scale > threshold; y = (x where keep) @ weight + ((x where not keep) @
  lowrank_in) @ lowrank_out. weight [K, N]; lowrank_in [K, r] and lowrank_out [r, N] are the top r
  singular components of weight (U_r Σ_r and V_rᵀ), so dropped channels still reach y through them.
- `PredictActive(x, A, B, bias, t)`, `PredictActiveTopK(x, A, B, bias, k)`,
  `PredictActiveStat(x, A, B, bias, z) -> mask`: a low-rank predictor's 0/1 mask of the FFN neurons
  that will be active (threshold / top-k / mean + z std of the logits x A B + bias); their
  function bodies are built by passes/predictor.py.

One check per op family: `is_sparsify`, `is_predict_active`, `is_rank_sparse_matmul`,
`is_cached_attention`; and `is_matmul_nbits` for the one com.microsoft op the passes write.
The lowering-only ops (domain `actsparse.lowering`) are in codegen/lowering/ops.py.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import helper

DOMAIN = "actsparse"
VERSION = 1
SPARSIFY = "Sparsify"
SPARSIFY_WEIGHTED = "SparsifyWeighted"
CUSTOM_OPS = (SPARSIFY, SPARSIFY_WEIGHTED)
CACHED_ATTENTION = "CachedAttention"
RANK_SPARSE_MATMUL = "RankSparseMatMul"
PREDICT_THRESHOLD, PREDICT_TOPK, PREDICT_STAT = "PredictActive", "PredictActiveTopK", "PredictActiveStat"
PREDICTOR_OPS = {"threshold": PREDICT_THRESHOLD, "topk": PREDICT_TOPK, "statistical": PREDICT_STAT}  # by mode
PREDICTOR_MODES = {op: mode for mode, op in PREDICTOR_OPS.items()}
# Every op of the domain: (inputs, outputs); none takes attributes.
SIGNATURES = {
    SPARSIFY: (2, 1), SPARSIFY_WEIGHTED: (3, 1), CACHED_ATTENTION: (5, 3), RANK_SPARSE_MATMUL: (6, 1),
    PREDICT_THRESHOLD: (5, 1), PREDICT_TOPK: (5, 1), PREDICT_STAT: (5, 1),
}
MS_DOMAIN = "com.microsoft"
MATMUL_NBITS = "MatMulNBits"  # int4 weights (passes/quantize.py), lowered by codegen/lowering/quant.py


def _cached_attention_proto(onnx_opset: int) -> onnx.FunctionProto:
    nodes = [
        helper.make_node("Concat", ["past_k", "k"], ["present_k"], axis=1),
        helper.make_node("Concat", ["past_v", "v"], ["present_v"], axis=1),
        helper.make_node("Transpose", ["present_k"], ["k_t"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["q", "k_t"], ["scores"]),
        helper.make_node("Softmax", ["scores"], ["probs"], axis=-1),
        helper.make_node("MatMul", ["probs", "present_v"], ["out"]),
    ]
    return helper.make_function(DOMAIN, CACHED_ATTENTION, ["q", "k", "v", "past_k", "past_v"],
                                ["out", "present_k", "present_v"], nodes,
                                opset_imports=[helper.make_opsetid("", onnx_opset)])


def _rank_sparse_matmul_proto(onnx_opset: int) -> onnx.FunctionProto:
    nodes = [
        helper.make_node("Abs", ["x"], ["magnitude"]),
        helper.make_node("Mul", ["magnitude", "channel_scale"], ["score"]),
        helper.make_node("Greater", ["score", "threshold"], ["keep"]),
        helper.make_node("Sub", ["threshold", "threshold"], ["zero"]),
        helper.make_node("Where", ["keep", "x", "zero"], ["kept"]),
        helper.make_node("Where", ["keep", "zero", "x"], ["dropped"]),
        helper.make_node("MatMul", ["kept", "weight"], ["sparse_part"]),
        helper.make_node("MatMul", ["dropped", "lowrank_in"], ["projected"]),
        helper.make_node("MatMul", ["projected", "lowrank_out"], ["lowrank_part"]),
        helper.make_node("Add", ["sparse_part", "lowrank_part"], ["y"]),
    ]
    return helper.make_function(DOMAIN, RANK_SPARSE_MATMUL,
                                ["x", "threshold", "channel_scale", "weight", "lowrank_in", "lowrank_out"], ["y"],
                                nodes, opset_imports=[helper.make_opsetid("", onnx_opset)])


def is_rank_sparse_matmul(node: ir.Node) -> bool:
    return node.domain == DOMAIN and node.op_type == RANK_SPARSE_MATMUL


def is_cached_attention(node: ir.Node) -> bool:
    return node.domain == DOMAIN and node.op_type == CACHED_ATTENTION


def _function_proto(name: str, onnx_opset: int) -> onnx.FunctionProto:
    weighted = name == SPARSIFY_WEIGHTED
    nodes = [helper.make_node("Abs", ["x"], ["magnitude"])]
    score = "magnitude"
    if weighted:
        nodes.append(helper.make_node("Mul", ["magnitude", "channel_scale"], ["score"]))
        score = "score"
    nodes += [
        helper.make_node("Greater", [score, "threshold"], ["keep"]),
        # threshold - threshold is a zero of x's dtype in every opset (CastLike needs opset 15).
        helper.make_node("Sub", ["threshold", "threshold"], ["zero"]),
        helper.make_node("Where", ["keep", "x", "zero"], ["y"]),
    ]
    inputs = ["x", "threshold"] + (["channel_scale"] if weighted else [])
    return helper.make_function(
        DOMAIN, name, inputs, ["y"], nodes,
        opset_imports=[helper.make_opsetid("", onnx_opset), helper.make_opsetid(DOMAIN, VERSION)],
    )


def _predict_active_proto(op: str, onnx_opset: int) -> onnx.FunctionProto:
    """PredictActive*(x, a, b, bias, param) -> mask: logits = x @ a @ b + bias, kept by the mode's rule."""
    nodes = [
        helper.make_node("MatMul", ["x", "a"], ["low"]),
        helper.make_node("MatMul", ["low", "b"], ["projected"]),
        helper.make_node("Add", ["projected", "bias"], ["logits"]),
    ]
    if op == PREDICT_THRESHOLD:
        nodes.append(helper.make_node("Greater", ["logits", "param"], ["keep"]))
    elif op == PREDICT_TOPK:
        # the k-th largest logit of each token is its cut-off (ties keep more, never fewer)
        nodes += [
            helper.make_node("TopK", ["logits", "param"], ["top", "top_index"], axis=-1),
            helper.make_node("Constant", [], ["minus_one"], value=helper.make_tensor("m", 7, [1], [-1])),
            helper.make_node("Constant", [], ["axis"], value=helper.make_tensor("a", 7, [1], [-1])),
            helper.make_node("Gather", ["top", "minus_one"], ["kth"], axis=-1),
            helper.make_node("GreaterOrEqual", ["logits", "kth"], ["keep"]),
        ]
    else:
        nodes += [
            helper.make_node("Constant", [], ["axis"], value=helper.make_tensor("a", 7, [1], [-1])),
            helper.make_node("ReduceMean", ["logits", "axis"], ["mean"], keepdims=1)
            if onnx_opset >= 18 else helper.make_node("ReduceMean", ["logits"], ["mean"], axes=[-1], keepdims=1),
            helper.make_node("Sub", ["logits", "mean"], ["centered"]),
            helper.make_node("Mul", ["centered", "centered"], ["squared"]),
            helper.make_node("ReduceMean", ["squared", "axis"], ["variance"], keepdims=1)
            if onnx_opset >= 18 else helper.make_node("ReduceMean", ["squared"], ["variance"], axes=[-1], keepdims=1),
            helper.make_node("Sqrt", ["variance"], ["std"]),
            helper.make_node("Mul", ["std", "param"], ["spread"]),
            helper.make_node("Add", ["mean", "spread"], ["cut"]),
            helper.make_node("Greater", ["logits", "cut"], ["keep"]),
        ]
    nodes.append(helper.make_node("CastLike", ["keep", "x"], ["mask"]) if onnx_opset >= 15
                 else helper.make_node("Cast", ["keep"], ["mask"], to=1))
    return helper.make_function(DOMAIN, op, ["x", "a", "b", "bias", "param"], ["mask"], nodes,
                                opset_imports=[helper.make_opsetid("", onnx_opset)])


def ensure_function(model: ir.Model, name: str) -> None:
    """Add the op's function definition and the `actsparse` opset import, once."""
    if name not in (*CUSTOM_OPS, CACHED_ATTENTION, RANK_SPARSE_MATMUL, *PREDICTOR_MODES):
        raise ValueError(f"unknown actsparse op {name!r}")
    model.opset_imports.setdefault(DOMAIN, VERSION)
    key = (DOMAIN, name, "")
    if key not in model.functions:
        onnx_opset = model.opset_imports.get("", 18)
        builders = {CACHED_ATTENTION: _cached_attention_proto, RANK_SPARSE_MATMUL: _rank_sparse_matmul_proto}
        if name in PREDICTOR_MODES:
            proto = _predict_active_proto(name, onnx_opset)
        else:
            proto = builders[name](onnx_opset) if name in builders else _function_proto(name, onnx_opset)
        model.functions[key] = ir.serde.deserialize_function(proto)


def is_sparsify(node: ir.Node) -> bool:
    """Sparsify or SparsifyWeighted."""
    return node.domain == DOMAIN and node.op_type in CUSTOM_OPS


def is_predict_active(node: ir.Node) -> bool:
    """Any of the PredictActive* ops."""
    return node.domain == DOMAIN and node.op_type in PREDICTOR_MODES


def is_matmul_nbits(node: ir.Node) -> bool:
    return node.domain == MS_DOMAIN and node.op_type == MATMUL_NBITS


def add_initializer(model: ir.Model, name: str, array: np.ndarray) -> ir.Value:
    """A new initializer with a name not yet used in the graph."""
    name = unique_name(model, name)
    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                     const_value=ir.tensor(array, name=name))
    model.graph.register_initializer(value)
    return value


def unique_name(model: ir.Model, base: str) -> str:
    taken = set(model.graph.initializers) | {v.name for v in model.graph.inputs}
    taken |= {out.name for node in model.graph for out in node.outputs}
    name, suffix = base, 1
    while name in taken:
        name, suffix = f"{base}_{suffix}", suffix + 1
    return name


def insert_sparsify(model: ir.Model, x: ir.Value, threshold: ir.Value, channel_scale: ir.Value | None = None,
                    *, name: str) -> ir.Value:
    """Append a Sparsify node reading `x` (placed right after x's producer) and return its output.
    The caller rewires the consumers that should see the sparse value."""
    op = SPARSIFY if channel_scale is None else SPARSIFY_WEIGHTED
    ensure_function(model, op)
    inputs = [x, threshold] + ([channel_scale] if channel_scale is not None else [])
    node = ir.Node(DOMAIN, op, inputs, name=unique_node_name(model, name))
    out = node.outputs[0]
    out.name = unique_name(model, f"{x.name}_sparse")
    out.type, out.shape = x.type, x.shape
    producer = x.producer()
    if producer is not None and producer.graph is model.graph:
        model.graph.insert_after(producer, node)
    else:
        model.graph.insert_before(next(iter(model.graph)), node)
    return out


def unique_node_name(model: ir.Model, base: str) -> str:
    taken = {node.name for node in model.graph}
    name, suffix = base, 1
    while name in taken:
        name, suffix = f"{base}_{suffix}", suffix + 1
    return name
