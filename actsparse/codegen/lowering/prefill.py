"""Bind a prompt-chunk graph to the weights of the lowered decode step, and lower its ops.

A causal LM's artifact has two entry points over ONE copy of the weights: `main` (one token,
the batch-1 kernels the passes chose) and `prefill` (a chunk of prompt tokens, dense multi-row
GEMMs). `frontend/decode_graph.build_prefill_graph` gives the chunk's graph with placeholders;
`bind_prefill` points each at the arrays the decode step's kernel was given, in whatever layout
that kernel packed them:

    decode step (lowered)                                prefill (this module)
    ActsparseDenseLinear(x, Wp panels)             =>  PrefillLinear(x, Wp)   layout packed
    ActsparseSparseLinear(x, [t, s,] W [K, N])     =>  PrefillLinear(x, W)    layout kn (rows)
    ActsparseRankSparseLinear(x, t, s, A, [W; B])  =>  PrefillLinear(x, [W; B]) layout kn, its first K rows
    MatMul(x, W) left to TVM                       =>  PrefillLinear(x, W)    layout generic
    ActsparseQuantLinear(x, [t, s,] Wq, scales..)  =>  PrefillLinear(x, Wq, scales..) layout quant:
        the same int8/int4 kernel at M rows (the sparse-layout ones in mode nonzero, 8 rows a call);
        the one-row VNNI kernels' rows => int8_vnni_rows_matmul / int4_vnni_rows_matmul, all M rows
        in one call
    ActsparseFusedFFN(x, ...) over gate, up, down  =>  gate/up GEMM(s) on the fused weights,
        ffn_dense:        one GEMM over the [gate L | up L] panels, split per panel
        ffn_input_sparse: one GEMM over [Wg | Wu] (kn), split in halves
        ffn_gate_sparse:  gate over its panels, up over Wu^T (nk)
        ffn_indexed:      gate and up over the interleaved [F, 2, D] rows (nk)
      then act(gate [- shift]) * up and down over Wd [F, D] (kn) or its panels

The prompt runs dense: thresholds and predictors are for the decode step's batch-1 kernels
(a chunk of 32 tokens activates nearly every channel), so the chunk computes what the model
with the passes' weights computes. int8 or int4 + a sparsifier on AVX-512 VNNI CPUs (a one-row
VNNI kernel in the decode step) keeps that kernel's arithmetic in the chunk: x rounded to int8 per
row (int8: per token, as each decode step rounds it; int4: per row and group), integer dot
products over the same rows; the other quantized chunks multiply float x by the codes. A relufied
model's chunk is built with the activation `relufy` put in the decode step (lm/compile.py).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from actsparse.codegen.lowering.ops import (DENSE_LINEAR, FUSED_FFN, LOWERING_DOMAIN, PREFILL_ATTENTION, PREFILL_LINEAR,
                                            QUANT_LINEAR, RANK_SPARSE_LINEAR, SPARSE_LINEAR, as_converter, attr_text,
                                            is_lowering_op)
from actsparse.codegen.targets import TargetInfo

PACKED, ROWS, COLUMNS, GENERIC, QUANT = "packed", "kn", "nk", "generic", "quant"
QUANT_PASS_SUFFIXES = (".matmul_integer", ".matmul_nbits", ".matmul_qdq")  # passes/quantize.py's node names


def bind_prefill(prefill: ir.Model, decode: ir.Model) -> str | None:
    """Bind `prefill`'s placeholders and weights to `decode`'s (lowered, weights packed), in
    place. Returns None, or why the chunk cannot share the decode step's weights."""
    kernels: dict[str, ir.Node] = {}
    for node in decode.graph:
        if is_lowering_op(node, DENSE_LINEAR, SPARSE_LINEAR, RANK_SPARSE_LINEAR):
            kernels[node.attributes.get_string("layer")] = node
        elif is_lowering_op(node, FUSED_FFN):
            for name in node.attributes.get_strings("linears"):
                kernels[name] = node
        elif is_lowering_op(node, QUANT_LINEAR):  # one layer, or several side by side ("layers")
            for layer in _quant_layers(node):
                kernels[layer] = node
        elif node.op_type in ("MatMul", "Gemm") and node.name:
            kernels[node.name] = node
    placeholders = {node.attributes.get_string("layer"): node for node in prefill.graph
                    if is_lowering_op(node, PREFILL_LINEAR)}
    missing = sorted(set(placeholders) - set(kernels))
    if missing:
        return f"no decode-step kernel for {missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
    reason = _share_initializers(prefill, decode)
    if reason:
        return reason
    fused = {id(node): node for name, node in kernels.items() if node.op_type == FUSED_FFN and name in placeholders}
    for node in fused.values():
        _bind_fused_ffn(prefill, node, placeholders)
    bound_by_ffn = {name for node in fused.values() for name in node.attributes.get_strings("linears")}
    side_by_side: dict[tuple[int, int], ir.Value] = {}  # chunk product per (shared quant kernel, input)
    for name, placeholder in placeholders.items():
        if name not in bound_by_ffn:
            reason = _bind_linear(prefill, placeholder, kernels[name], side_by_side)
            if reason:
                return reason
    import onnx_ir.passes.common as common

    common.RemoveUnusedNodesPass()(prefill)
    prefill.graph.sort()  # the bound nodes were appended after their users
    return None


# A weight the decode step no longer has (its optimizer removed a multiplication by ones, say) is
# compiled into the prefill code when it is at most this many elements (norm scales, biases).
INLINE_LIMIT = 1 << 16


def _share_initializers(prefill: ir.Model, decode: ir.Model) -> str | None:
    """Every weight of the chunk graph is the decode step's array of the same name (norm scales,
    embeddings, rotary tables, biases): checked equal, then shared."""
    for name, value in list(prefill.graph.initializers.items()):
        if name.startswith("prefill.const."):
            continue  # small constants: compiled into the code (relax_import._small_constants_inline)
        mine = value.const_value.numpy()
        theirs = decode.graph.initializers.get(name)
        if theirs is None or theirs.const_value is None:
            if mine.size > INLINE_LIMIT:
                return f"the decode step has no weight {name!r}"
            _inline(prefill, value)
            continue
        shared = theirs.const_value.numpy()
        if mine.shape != shared.shape or mine.dtype != shared.dtype or not np.array_equal(mine, shared):
            return f"weight {name!r} differs from the decode step's (changed by a pass)"
        value.const_value = theirs.const_value
    return None


def _inline(prefill: ir.Model, value: ir.Value) -> None:
    """The initializer `value` -> a Constant node (part of the compiled code, not a parameter)."""
    constant = ir.Node("", "Constant", [], attributes=[ir.AttrTensor("value", value.const_value)],
                       name=f"prefill.inline.{value.name}")
    constant.outputs[0].name = f"prefill.inline.{value.name}"
    constant.outputs[0].shape, constant.outputs[0].type = value.shape, value.type
    prefill.graph.insert_before(next(iter(prefill.graph)), constant)
    ir.convenience.replace_all_uses_with(value, constant.outputs[0])
    prefill.graph.initializers.pop(value.name)


def _weight(prefill: ir.Model, value: ir.Value) -> ir.Value:
    """The chunk graph's initializer over the decode step's `value` (same name, same array)."""
    existing = prefill.graph.initializers.get(value.name)
    if existing is not None:
        return existing
    shared = ir.Value(name=value.name, shape=value.shape, type=value.type, const_value=value.const_value)
    prefill.graph.register_initializer(shared)
    return shared


def _linear_node(prefill: ir.Model, x: ir.Value, weight: ir.Value, layout: str, rows: int, k: int, n: int,
                 name: str, row_stride: int = 0, offset: int = 0) -> ir.Value:
    attributes = {"layout": ir.AttrString("layout", layout), "rows": ir.AttrInt64("rows", rows),
                  "k": ir.AttrInt64("k", k), "n": ir.AttrInt64("n", n),
                  "row_stride": ir.AttrInt64("row_stride", row_stride), "offset": ir.AttrInt64("offset", offset)}
    node = ir.Node(LOWERING_DOMAIN, PREFILL_LINEAR, [x, _weight(prefill, weight)], attributes=attributes,
                   name=name)
    node.outputs[0].name = f"{name}.out"
    prefill.graph.append(node)
    return node.outputs[0]


def _rows_of(placeholder: ir.Node) -> int:
    return int(placeholder.attributes.get_int("rows", 0))


def _quant_layers(node: ir.Node) -> list[str]:
    """The layer names a quant kernel node serves (passes/quantize.py's node suffixes removed)."""
    names = node.attributes.get_strings("layers", None) or [node.attributes.get_string("layer", "")]
    out = []
    for layer in names:
        for suffix in QUANT_PASS_SUFFIXES:
            layer = layer.removesuffix(suffix)
        out.append(layer)
    return out


def _bind_linear(prefill: ir.Model, placeholder: ir.Node, kernel: ir.Node,
                 side_by_side: dict[tuple[int, int], ir.Value]) -> str | None:

    if kernel.op_type == QUANT_LINEAR:
        return _bind_quant(prefill, placeholder, kernel, side_by_side)
    weight = kernel.inputs[-1] if is_lowering_op(kernel) else kernel.inputs[1]
    if weight is None or weight.const_value is None:
        return f"{placeholder.name}: the decode step's weight is not a constant"
    n = placeholder.attributes.get_int("n")
    if is_lowering_op(kernel, DENSE_LINEAR):
        layout, k = PACKED, int(weight.shape[1])
    elif is_lowering_op(kernel, RANK_SPARSE_LINEAR):  # [W; B]: the chunk reads W, the first k rows
        layout, k = ROWS, kernel.attributes.get_int("k")
    elif is_lowering_op(kernel):
        layout, k = ROWS, int(weight.shape[0])
    elif kernel.op_type == "MatMul" and len(weight.shape) == 2 and int(weight.shape[1]) == n:
        layout, k = GENERIC, int(weight.shape[0])
    else:
        return f"{placeholder.name}: a {kernel.op_type} the chunk cannot share"
    out = _linear_node(prefill, placeholder.inputs[0], weight, layout, _rows_of(placeholder), k, n,
                       f"{placeholder.name}.prefill")
    _replace(prefill, placeholder, out)
    return None


def _bind_quant(prefill: ir.Model, placeholder: ir.Node, kernel: ir.Node,
                side_by_side: dict[tuple[int, int], ir.Value]) -> str | None:
    """The packed int8/int4 arrays (named "<layer>.<role>_<kind>_packed") and the kernel's attributes.
    A kernel serving several layers side by side (q/k/v, gate/up) runs once per chunk, over the
    input they share; each layer takes its columns (a Slice). Where the chunk graph gives those
    layers different inputs (two equal norms the decode step's optimizer merged into one, as in a
    freshly initialized GPT-NeoX), it runs once per input: extra columns, not token-by-token steps."""
    x = placeholder.inputs[0]
    layers = _quant_layers(kernel)
    product = side_by_side.get((id(kernel), id(x)))
    if product is None:
        weights = [_weight(prefill, v) for v in kernel.inputs[1:] if v is not None and v.name.endswith("_packed")]
        attributes = {name: kernel.attributes[name] for name in ("kind", "mode", "k", "n", "group", "zero_points",
                                                                 "lanes", "int8_dot")}
        attributes |= {"layout": ir.AttrString("layout", QUANT), "rows": ir.AttrInt64("rows", _rows_of(placeholder))}
        name = f"{placeholder.name}.prefill" if len(layers) == 1 else f"{kernel.name}.prefill"
        earlier = sum(key[0] == id(kernel) for key in side_by_side)
        name += f".{earlier}" if earlier else ""
        node = ir.Node(LOWERING_DOMAIN, PREFILL_LINEAR, [x, *weights], attributes=attributes, name=name)
        node.outputs[0].name = f"{name}.out"
        prefill.graph.append(node)
        product = side_by_side[(id(kernel), id(x))] = node.outputs[0]
        if len(layers) == 1:
            _replace(prefill, placeholder, product)
            return None
    part = layers.index(placeholder.attributes.get_string("layer"))
    start = kernel.attributes.get_ints("offsets")[part]
    stop = start + kernel.attributes.get_ints("parts")[part]
    _replace(prefill, placeholder, _columns(prefill, product, start, stop, f"{placeholder.name}.prefill.columns",
                                            placeholder.name, axis=-1))
    return None


def _append(prefill: ir.Model, op_type: str, inputs: list, name: str) -> ir.Value:
    """A new node `name` at the end of the chunk graph; its output."""
    node = ir.Node("", op_type, inputs, name=name)
    node.outputs[0].name = f"{name}.out"
    prefill.graph.append(node)
    return node.outputs[0]


def _const(prefill: ir.Model, owner: str, values, dtype=np.int64) -> ir.Value:
    """A small constant of the chunk graph (compiled in: relax_import._small_constants_inline)."""
    value = ir.Value(name=f"prefill.const.{owner}.{len(prefill.graph.initializers)}",
                     const_value=ir.tensor(np.asarray(values, dtype)))
    value.shape, value.type = ir.Shape(value.const_value.shape), ir.TensorType(value.const_value.dtype)
    prefill.graph.register_initializer(value)
    return value


def _columns(prefill: ir.Model, value: ir.Value, start: int, stop: int, name: str, owner: str,
             axis: int = 1) -> ir.Value:
    """value[..., start:stop] along `axis` (a Slice node `name`, its bounds constants of `owner`)."""
    bounds = [_const(prefill, owner, [bound]) for bound in (start, stop, axis)]
    return _append(prefill, "Slice", [value, *bounds], name)


def _replace(prefill: ir.Model, placeholder: ir.Node, value: ir.Value) -> None:
    value.shape, value.type = placeholder.outputs[0].shape, placeholder.outputs[0].type
    ir.convenience.replace_all_uses_with(placeholder.outputs[0], value)


def _bind_fused_ffn(prefill: ir.Model, fused: ir.Node, placeholders: dict[str, ir.Node]) -> None:
    """gate, up, act, Mul, down of the chunk graph -> GEMMs over the fused kernel's weights."""
    from actsparse.codegen.lowering.ffn_fusion import DENSE, GATE_SPARSE, INDEXED

    gate_name, _, down_name = fused.attributes.get_strings("linears")
    gate, down = placeholders[gate_name], placeholders[down_name]
    form, act = fused.attributes.get_string("kernel"), fused.attributes.get_string("act")
    d, f = fused.attributes.get_int("d"), fused.attributes.get_int("f")
    shifted = bool(fused.attributes.get_int("shifted", 0))
    x, rows, name = gate.inputs[0], _rows_of(gate), fused.name
    # The fused node's initializers are named "<block>.<role>" (ffn_fusion._replace).
    weights = {v.name.rsplit(".", 1)[-1]: v for v in fused.inputs[1:] if v is not None}
    shift = weights.get("shift") if shifted else None

    def op(op_type: str, inputs: list, suffix: str) -> ir.Value:
        return _append(prefill, op_type, inputs, f"{name}/{suffix}")

    def const(values, dtype=np.int64) -> ir.Value:
        return _const(prefill, name, values, dtype)

    def columns(value: ir.Value, start: int, stop: int, suffix: str, axis: int = 1) -> ir.Value:
        return _columns(prefill, value, start, stop, f"{name}/{suffix}", name, axis)

    if form == DENSE:  # panels of [gate L | up L]: [rows, panels, 2, L]
        panels, _, width = (int(s) for s in weights["gate_up_panels"].shape)
        both = _linear_node(prefill, x, weights["gate_up_panels"], PACKED, rows, d, panels * width, f"{name}.gate_up")
        both = op("Reshape", [both, const([rows, panels, 2, width // 2])], "panels")
        halves = [columns(both, i, i + 1, f"half{i}", axis=2) for i in (0, 1)]  # [rows, panels, 1, L] each
        g, u = (op("Reshape", [half, const([rows, panels * width // 2])], f"{role}_flat")
                for half, role in zip(halves, ("gate", "up")))
        g, u = columns(g, 0, f, "gate"), columns(u, 0, f, "up")
        down_weight, down_layout = weights["down_panels"], PACKED
    elif form == GATE_SPARSE:  # gate panels, Wu^T [F, D], Wd [F, D]
        panels, _, width = (int(s) for s in weights["gate_packed"].shape)
        gate_all = _linear_node(prefill, x, weights["gate_packed"], PACKED, rows, d, panels * width, f"{name}.gate")
        g = columns(gate_all, 0, f, "gate")
        u = _linear_node(prefill, x, weights["up_t"], COLUMNS, rows, d, f, f"{name}.up")
        down_weight, down_layout = weights["down"], ROWS
    elif form == INDEXED:  # gate_up_t [F, 2, D]: gate rows from 0, up rows from D, 2D apart
        gate_up = weights["gate_up_t"]
        g = _linear_node(prefill, x, gate_up, COLUMNS, rows, d, f, f"{name}.gate", row_stride=2 * d)
        u = _linear_node(prefill, x, gate_up, COLUMNS, rows, d, f, f"{name}.up", row_stride=2 * d, offset=d)
        down_weight, down_layout = weights["down"], ROWS
    else:  # input_sparse: [Wg | Wu] [D, 2F], Wd [F, D]
        both = _linear_node(prefill, x, weights["gate_up"], ROWS, rows, d, 2 * f, f"{name}.gate_up")
        g, u = columns(both, 0, f, "gate"), columns(both, f, 2 * f, "up")
        down_weight, down_layout = weights["down"], ROWS
    if shift is not None:
        g = op("Sub", [g, _weight(prefill, shift)], "shift")
    if act == "relu":
        a = op("Relu", [g], "act")
    else:  # silu
        a = op("Mul", [g, op("Sigmoid", [g], "sigmoid")], "act")
    hidden = op("Mul", [a, u], "hidden")
    out = _linear_node(prefill, hidden, down_weight, down_layout, rows, f, d, f"{name}.down")
    _replace(prefill, down, out)


# ------------------------------------------------------------------------------ TVM import

def prefill_converters(target: TargetInfo) -> dict:
    """from_onnx converters for PrefillLinear and PrefillAttention."""
    from tvm import relax

    from actsparse.codegen.kernels.cpu.attention import prefill_attention
    from actsparse.codegen.kernels.cpu.dense import dense_matmul

    functions: dict[tuple, object] = {}
    lanes = target.kernel_lanes("dense")

    def add(bb, key: tuple, symbol: str, build):
        if key not in functions:
            functions[key] = bb.add_func(build().with_attr("global_symbol", symbol), symbol)
        return functions[key]

    def quant(bb, inputs, attrs):
        """The decode step's int8/int4 kernel at M rows; sparse layouts in mode nonzero (every
        nonzero input counts: the dense product), at most MAX_SPARSE_ROWS rows a call, except the
        VNNI kernels' rows (int8_vnni_rows_matmul, int4_vnni_rows_matmul), which take every row in
        one call."""
        from actsparse.codegen.lowering.quant import MAX_SPARSE_ROWS, quant_kernel

        kind, mode = attr_text(attrs["kind"]), attr_text(attrs["mode"])
        rows, k, n, group = int(attrs["rows"]), int(attrs["k"]), int(attrs["n"]), int(attrs["group"])
        zero_points, kernel_lanes_, int8_dot = bool(attrs["zero_points"]), int(attrs["lanes"]), bool(attrs["int8_dot"])
        mode = "dense" if mode == "dense" else "nonzero"
        step = rows if mode == "dense" or int8_dot else MAX_SPARSE_ROWS
        x = bb.emit(relax.op.reshape(inputs[0], (rows, k)))
        parts = []
        for start in range(0, rows, step):
            m = min(step, rows - start)
            key = ("prefill_quant", kind, mode, m, k, n, group, zero_points, kernel_lanes_, int8_dot)
            symbol = (f"actsparse_prefill_{kind}_{mode}_m{m}_k{k}_n{n}" + (f"_g{group}" if kind == "int4" else "")
                      + ("_zp" if zero_points else "") + ("_vnni" if int8_dot else ""))
            func = add(bb, key, symbol, lambda m=m: quant_kernel(kind, mode, m, k, n, group, zero_points,
                                                                 kernel_lanes_, int8_dot, target.row_schedule))
            rows_x = x if m == rows else bb.emit(relax.op.strided_slice(x, axes=[0], begin=[start], end=[start + m]))
            parts.append(bb.emit(relax.call_tir(func, [rows_x, *inputs[1:]], relax.TensorType((m, n), "float32"))))
        return parts[0] if len(parts) == 1 else relax.op.concat(parts, axis=0)

    def linear(bb, inputs, attrs, params):
        x, w = inputs[0], inputs[1]
        layout = attr_text(attrs["layout"])
        if layout == QUANT:
            return quant(bb, inputs, attrs)
        rows, k, n = int(attrs["rows"]), int(attrs["k"]), int(attrs["n"])
        stride, offset = int(attrs.get("row_stride", 0)), int(attrs.get("offset", 0))
        x2 = bb.emit(relax.op.reshape(x, (rows, k)))
        block = 2 * lanes if layout != PACKED else int(w.ty.shape[2])
        weight_rows = int(w.ty.shape[0]) if layout == ROWS else k  # R-Sparse's [W; B]: W is the first k rows
        if layout == GENERIC or (layout != PACKED and n % block):
            if layout == COLUMNS:
                w = bb.emit(relax.op.permute_dims(_columns_view(bb, w, n, k, stride, offset)))
            if weight_rows != k:
                w = bb.emit(relax.op.strided_slice(w, axes=[0], begin=[0], end=[k]))
            return relax.op.matmul(x2, w)  # TVM's own GEMM (schedule_tvm_ops)
        key = ("prefill_dense", layout, rows, k, n, block, stride, offset, weight_rows)
        symbol = (f"actsparse_prefill_{layout}_m{rows}_k{k}_n{n}" + (f"_s{stride}_o{offset}" if stride else "")
                  + (f"_of{weight_rows}" if weight_rows != k else ""))
        func = add(bb, key, symbol, lambda: dense_matmul(rows, k, n, lanes=block // 2, layout=layout,
                                                         row_stride=stride or None, offset=offset,
                                                         schedule=target.row_schedule, weight_rows=weight_rows))
        if layout == COLUMNS and stride:
            w = bb.emit(relax.op.reshape(w, (int(np.prod([int(s) for s in w.ty.shape])),)))
        return relax.call_tir(func, [x2, w], relax.TensorType((rows, n), "float32"))

    def attention(bb, inputs, attrs, params):
        q, k, v, cache_k, cache_v, position = inputs
        kv, group, d = int(attrs["kv_heads"]), int(attrs["group"]), int(attrs["head_dim"])
        capacity, window = int(attrs["capacity"]), int(attrs.get("window", 0))
        dtype = attr_text(attrs.get("cache_dtype", "float32"))
        rows = int(q.ty.shape[0])
        key = ("prefill_attention", kv, group, d, capacity, window, rows, dtype)
        symbol = f"actsparse_prefill_attention_kv{kv}_g{group}_d{d}_c{capacity}_w{window}_r{rows}_{dtype}"
        func = add(bb, key, symbol, lambda: prefill_attention(kv, group, d, capacity, rows, window=window,
                                                              cache_dtype=dtype))
        return relax.call_tir(func, [q, k, v, cache_k, cache_v, position],
                              relax.TensorType((rows, kv * group, d), "float32"))

    return {PREFILL_LINEAR: as_converter(linear), PREFILL_ATTENTION: as_converter(attention)}


def _columns_view(bb, w, n: int, k: int, stride: int, offset: int):
    from tvm import relax

    if not stride:
        return w
    rows = bb.emit(relax.op.reshape(w, (n, stride)))
    return bb.emit(relax.op.strided_slice(rows, axes=[1], begin=[offset], end=[offset + k]))
