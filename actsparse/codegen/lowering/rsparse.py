"""Lower actsparse.RankSparseMatMul (the `rsparse` pass) before the other linears get kernels.

    one token (x [1, K] or [1, 1, K]) on a CPU, constant operands, rank >= 1:
        RankSparseMatMul(x, t, s, W, A, B)  =>  ActsparseRankSparseLinear(x, t, s, A panels, [W; B])
                                                (kernels/cpu/rsparse.py: one walk over the kept rows
                                                 of W and the rows of B)
    otherwise (prefill rows, CUDA, a threshold given at run time):
        RankSparseMatMul(x, t, s, W, A, B)  =>  xs = SparsifyWeighted(x, t, s); d = x - xs
                                                y = MatMul(xs, W) + MatMul(MatMul(d, A), B)
        whose MatMuls then take the usual per-linear kernels (sparse-input for xs at up to
        SPARSE_MAX_ROWS rows, dense otherwise), so the compiled model computes what onnxruntime does.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from actsparse.codegen.lowering.ops import LOWERING_DOMAIN, RANK_SPARSE_LINEAR, as_converter, declare_lowering_domain
from actsparse.codegen.targets import TargetInfo
from actsparse.ir.custom_ops import (DOMAIN, SPARSIFY_WEIGHTED, add_initializer, ensure_function,
                                     is_rank_sparse_matmul, unique_node_name)
from actsparse.ir.large import drop_pages


def select_rank_sparse_kernels(model: ir.Model, on_cpu: bool = True, lanes: int = 16) -> list[dict]:
    """Rewrite every RankSparseMatMul node in place (module docstring); one plan entry per fused
    kernel ({"name", "kernel": "rsparse", "shape", "rank"}). Expanded ones get their entries from
    the per-linear selection that follows. `on_cpu`: the fused kernel is a CPU kernel (no CUDA twin)."""
    layers = []
    for node in [n for n in model.graph if is_rank_sparse_matmul(n)]:
        operands = _constants(node)
        if on_cpu and operands is not None and _single_row(node.inputs[0]) and operands[3].shape[1] >= 1:
            layers.append(_fuse(model, node, operands, lanes))
        else:
            _expand(model, node)
    if layers:
        declare_lowering_domain(model)
    return layers


def _constants(node: ir.Node) -> list[np.ndarray] | None:
    """threshold, scale, W, A, B as float32 arrays when all are constants, else None."""
    arrays = []
    for value in node.inputs[1:]:
        tensor = None if value is None or value.is_graph_input() else ir.convenience.get_const_tensor(value)
        if tensor is None:
            return None
        arrays.append(tensor.numpy().astype(np.float32, copy=False))
    threshold, scale, w, a, b = arrays
    if threshold.size != 1 or w.ndim != 2 or a.shape != (w.shape[0], b.shape[0]) or b.shape[1] != w.shape[1]:
        return None
    return arrays


def _single_row(x: ir.Value) -> bool:
    shape = x.shape
    return (shape is not None and len(shape) >= 1 and all(isinstance(d, int) for d in shape)
            and int(np.prod(shape[:-1], dtype=np.int64)) == 1)


def _fuse(model: ir.Model, node: ir.Node, operands: list[np.ndarray], lanes: int) -> dict:
    from actsparse.codegen.kernels.cpu.rsparse import pack_rank_sparse

    threshold, scale, w, a, b = operands
    k, n = w.shape
    rank = a.shape[1]
    a_panels, wb = pack_rank_sparse(w, a, b, lanes)
    drop_pages(w)
    name = node.name or "rsparse"
    inputs = [node.inputs[0], add_initializer(model, f"{name}.threshold", threshold.reshape(1)),
              add_initializer(model, f"{name}.scale", scale.reshape(k)),
              add_initializer(model, f"{name}.lowrank_in_panels", a_panels),
              add_initializer(model, f"{name}.weight_lowrank_out", wb)]
    attributes = {"k": ir.AttrInt64("k", k), "n": ir.AttrInt64("n", n), "rank": ir.AttrInt64("rank", rank),
                  "lanes": ir.AttrInt64("lanes", lanes),
                  # the linear the pass rewrote ("<linear>.rsparse"): a causal LM's prompt chunk binds to it
                  "layer": ir.AttrString("layer", name.removesuffix(".rsparse"))}
    fused = ir.Node(LOWERING_DOMAIN, RANK_SPARSE_LINEAR, inputs, attributes=attributes,
                    name=unique_node_name(model, f"{name}.kernel"))
    _take_over(model, node, fused)
    return {"name": name, "kernel": "rsparse", "shape": [k, n], "rank": rank}


def _expand(model: ir.Model, node: ir.Node) -> None:
    x, threshold, scale, w, a, b = node.inputs
    name = node.name or "rsparse"
    ensure_function(model, SPARSIFY_WEIGHTED)

    def emit(domain: str, op: str, inputs, suffix: str) -> ir.Value:
        new = ir.Node(domain, op, inputs, name=unique_node_name(model, f"{name}/{suffix}"))
        model.graph.insert_before(node, new)
        return new.outputs[0]

    kept = emit(DOMAIN, SPARSIFY_WEIGHTED, [x, threshold, scale], "kept")
    kept.type, kept.shape = x.type, x.shape
    dropped = emit("", "Sub", [x, kept], "dropped")
    dropped.type, dropped.shape = x.type, x.shape
    sparse_part = emit("", "MatMul", [kept, w], "sparse_part")
    projected = emit("", "MatMul", [dropped, a], "projected")
    low_rank_part = emit("", "MatMul", [projected, b], "low_rank_part")
    out = node.outputs[0]
    for value in (sparse_part, low_rank_part):
        value.type, value.shape = out.type, out.shape
    if x.shape is not None and a.shape is not None:
        projected.type, projected.shape = out.type, ir.Shape([*x.shape[:-1], a.shape[1]])
    total = ir.Node("", "Add", [sparse_part, low_rank_part], name=unique_node_name(model, f"{name}/sum"))
    model.graph.insert_before(node, total)
    _take_over(model, node, total)


def _take_over(model: ir.Model, node: ir.Node, new: ir.Node) -> None:
    """`new` (already placed, or placed here before `node`) replaces `node`'s output; `node` goes."""
    if new.graph is None:
        model.graph.insert_before(node, new)
    out = node.outputs[0]
    new.outputs[0].type, new.outputs[0].shape = out.type, out.shape
    name = out.name if out.is_graph_output() else None
    ir.convenience.replace_all_uses_with(out, new.outputs[0], replace_graph_outputs=True)
    if name:  # the model keeps its output names
        out.name, new.outputs[0].name = f"{name}.replaced", name
    model.graph.remove(node, safe=True)


def rank_sparse_converters(target: TargetInfo) -> dict:
    """from_onnx converter for ActsparseRankSparseLinear (one PrimFunc per k, n, rank)."""
    from tvm import relax

    from actsparse.codegen.kernels.cpu.rsparse import rank_sparse_matmul

    functions: dict[tuple, object] = {}

    def convert(bb, inputs, attrs, params):
        k, n, rank, lanes = (int(attrs[key]) for key in ("k", "n", "rank", "lanes"))
        key = (k, n, rank, lanes)
        if key not in functions:
            symbol = f"actsparse_rsparse_k{k}_n{n}_r{rank}"
            func = rank_sparse_matmul(k, n, rank, lanes=lanes, schedule=target.row_schedule)
            functions[key] = bb.add_func(func.with_attr("global_symbol", symbol), symbol)
        x, threshold, scale, a, wb = inputs
        shape = [int(d) for d in x.ty.shape]
        x2 = bb.emit(relax.op.reshape(x, (1, k))) if shape != [1, k] else x
        y = bb.emit(relax.call_tir(functions[key], [x2, threshold, scale, a, wb], relax.TensorType((1, n), "float32")))
        return relax.op.reshape(y, (*shape[:-1], n)) if shape != [1, k] else y

    return {RANK_SPARSE_LINEAR: as_converter(convert)}
