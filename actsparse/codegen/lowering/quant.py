"""Select our int8 / int4 kernels for quantized linears (graph side of the lowering).

Patterns matched on the ONNX graph (static shapes, after ``specialize_shapes``):

  (a) int8 QDQ:  MatMul(A, DequantizeLinear(W_q int8 [K, N], s_w [N], zero 0, axis=1))
      with A = DequantizeLinear(QuantizeLinear(x, s_x, z_x), s_x, z_x) or A = x (float32)
  (b) int8 dynamic: Mul(Cast(MatMulInteger(x_q, W_q, x_z, 0)), Mul(x_s, s_w))
      with (x_q, x_s, x_z) = DynamicQuantizeLinear(x)
  (c) int4: com.microsoft.MatMulNBits(x, B, scales[, zero_points]) with bits=4, no g_idx/bias
and, for each, where x comes from:
      Sparsify(v, t) / SparsifyWeighted(v, t, s) -> the sparse-input kernel with the threshold fused
      Relu (or Mul of a Relu)                     -> the sparse-input kernel, mode nonzero
      anything else                               -> the dense kernel
Each becomes one ``ActsparseQuantLinear`` node (domain actsparse.lowering) whose weights are
packed once, here, as initializers; ``quant_converters`` turns it into a ``call_tir`` of the
matching kernel in ``kernels/cpu/quant.py``.

Numerics: the activation's QuantizeLinear/DequantizeLinear (a) and DynamicQuantizeLinear (b) are
dropped: the float kernels compute float32 x times the dequantized int8 weights, where
onnxruntime multiplies integers; the VNNI kernels (x86 with AVX-512 VNNI) round x to int8 per
token (int8 sparse, batch 1; per row in prompt chunks) or per group (int4 dense, and int4 sparse at
batch 1 and per row in prompt chunks) themselves, with scale max|x| / 127 instead of the graph's
calibrated one. Either way the results differ from onnxruntime's by the
activation rounding (~1e-2 relative), which is the quantization error itself, not a kernel error.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from actsparse.codegen.lowering.ops import LOWERING_DOMAIN, QUANT_LINEAR, as_converter, attr_text, declare_lowering_domain
from actsparse.codegen.targets import DEFAULT_LANES, TargetInfo, describe_target
from actsparse.errors import ActsparseError
from actsparse.ir.custom_ops import SPARSIFY_WEIGHTED, add_initializer, is_matmul_nbits, is_sparsify, unique_node_name

MAX_SPARSE_ROWS = 8  # the sparse kernels unroll the rows of x: beyond this, use the dense ones


@dataclass
class QuantLinear:
    """One matched quantized linear: y = x @ W with W in int8 (q, scale) or int4 (codes, scales, zeros)."""

    output: ir.Value          # the float32 product this replaces
    x: ir.Value               # float32 input of the matmul (after any Sparsify)
    k: int
    n: int
    kind: str                 # "int8" or "int4"
    weights: tuple            # int8: (q [K, N], scale [N]); int4: (codes [N, Kp], scales [N, G], zeros [N, G] or None)
    group: int = 0
    name: str = ""
    # the graph itself rounds x to 8 bits (int8 QDQ on the activation, DynamicQuantizeLinear, or
    # MatMulNBits accuracy_level=4), so a kernel may too
    int8_activations: bool = False


def select_quant_kernels(model: ir.Model, lanes: int = DEFAULT_LANES, int8_dot: bool = False) -> list[dict]:
    """Rewrite every matched quantized linear into an ActsparseQuantLinear node, in place.
    ``int8_dot``: the target has AVX-512 VNNI; where the graph rounds the activations to 8 bits
    anyway, int4 layers (MatMulNBits accuracy_level=4) take ``int4_dense_matmul_vnni`` (dense) or,
    at batch 1, ``int4_sparse_matmul_vnni`` (sparse input), and batch-1 sparse-input int8 layers
    (activation QDQ or dynamic) ``int8_sparse_matmul_vnni``.

    Layers of one of those one-row VNNI kernels that read the same sparsified input (q, k and v;
    gate and up) become ONE node over their weights side by side (``shared_input_batches``),
    sliced per layer after it: one listing of the active channels and one parallel region
    instead of two or three, and longer rows. The small k/v calls (K=960, N=320) spent most of
    their time outside the weight reads.

    Returns one plan entry per rewritten layer ({"name", "kernel", "shape"}), in the form of
    ``select.KernelPlan.layers``. Nodes left without users are removed.
    """
    model = _infer_matmulnbits_shapes(model)
    matches = [match for node in list(model.graph) if (match := match_quant_linear(node)) is not None]
    # Last batch first: a batch's input may be an earlier batch's output (OPT-350m's project_out
    # feeds lm_head); rewriting that one afterwards moves the new kernel onto its replacement.
    rewritten = [_replace(model, batch, lanes, int8_dot) for batch in reversed(shared_input_batches(matches, int8_dot))]
    layers = [layer for batch_layers in reversed(rewritten) for layer in batch_layers]  # graph order
    if layers:
        import onnx_ir.passes.common as common

        common.RemoveUnusedNodesPass()(model)
        declare_lowering_domain(model)
    left = next((node for node in model.graph if is_matmul_nbits(node)), None)
    if left is not None:  # TVM's importer has no MatMulNBits: say which form, not "unsupported operator"
        raise ActsparseError(f"node {left.name!r} (MatMulNBits): a form the compiler does not take (it takes "
                             "4-bit codes, block_size a multiple of 16, no zero points or uint8 ones)")
    left = next((node for node in model.graph if is_int4_dequantize(node)), None)
    if left is not None:  # nor can it read int4 tensors ("TensorCopyFromBytes: size mismatch")
        raise ActsparseError(f"node {left.name!r} (int4 DequantizeLinear): a form the compiler does not take (it "
                             "takes constant int4 weights [K, N] feeding a MatMul, axis 0, block_size a multiple "
                             "of 16, uint4 zero points or none)")
    return layers


def _infer_matmulnbits_shapes(model: ir.Model) -> ir.Model:
    """Give MatMulNBits outputs their shape (x.shape[:-1] + [N]) and propagate shapes again.

    ONNX shape inference does not know com.microsoft ops, so everything after the first
    MatMulNBits is shapeless; the sparse/dense choice needs the row count of each input.
    """
    import onnx_ir.passes.common as common

    for _ in range(len(model.graph)):
        changed = False
        for node in model.graph:
            out, x = node.outputs[0], node.inputs[0] if node.inputs else None
            if is_matmul_nbits(node) and out.shape is None and x is not None and x.shape is not None:
                out.shape = ir.Shape([*list(x.shape)[:-1], node.attributes.get_int("N", 0)])
                out.type = x.type
                changed = True
        if not changed:
            return model
        model = common.ShapeInferencePass(strict_mode=False)(model).model
    return model


# ---------------------------------------------------------------------------- matching

INT4_TYPES = (ir.DataType.INT4, ir.DataType.UINT4)


def is_int4_dequantize(node: ir.Node) -> bool:
    """A DequantizeLinear of int4 / uint4 values (TVM's ONNX importer cannot read int4 tensors)."""
    return node.op_type == "DequantizeLinear" and bool(node.inputs) and node.inputs[0] is not None \
        and node.inputs[0].dtype in INT4_TYPES


def match_quant_linear(node: ir.Node) -> QuantLinear | None:
    """The quantized linear ending at ``node``, or None."""
    if node.domain in ("", "ai.onnx") and node.op_type == "MatMul":
        return _match_qdq(node)
    if node.domain in ("", "ai.onnx") and node.op_type == "Mul":
        return _match_dynamic(node) or _match_per_token(node)
    if is_matmul_nbits(node):
        return _match_matmulnbits(node)
    return None


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None:
        return None
    tensor = value.const_value
    if tensor is None:
        try:
            tensor = ir.convenience.get_const_tensor(value)
        except (ValueError, TypeError):
            return None
    return None if tensor is None else tensor.numpy()


def _producer(value: ir.Value | None, op_type: str, domain: str = "") -> ir.Node | None:
    node = value.producer() if value is not None else None
    if node is None or node.op_type != op_type or node.domain not in ({domain, "ai.onnx"} if domain == "" else {domain}):
        return None
    return node


def _int8_weight(q: np.ndarray | None, scale: np.ndarray | None, zero: np.ndarray | None) -> bool:
    return (q is not None and q.dtype == np.int8 and q.ndim == 2 and scale is not None
            and scale.size == q.shape[1] and (zero is None or not np.any(zero)))


def _float_input(value: ir.Value) -> bool:
    return value.dtype == ir.DataType.FLOAT and value.shape is not None and len(value.shape) >= 1


def _match_qdq(matmul: ir.Node) -> QuantLinear | None:
    a, b = matmul.inputs[0], matmul.inputs[1]
    dq_w = _producer(b, "DequantizeLinear")
    if dq_w is not None and dq_w.attributes.get_int("block_size", 0):
        return _match_blocked_int4(matmul, dq_w)
    if dq_w is None or dq_w.attributes.get_int("axis", 1) not in (1, -1):
        return None
    q, scale = _const(dq_w.inputs[0]), _const(dq_w.inputs[1])
    zero = _const(dq_w.inputs[2]) if len(dq_w.inputs) > 2 and dq_w.inputs[2] is not None else None
    if not _int8_weight(q, scale, zero):
        return None
    x = _through_activation_qdq(a)
    if not _float_input(x) or x.shape[-1] != q.shape[0]:
        return None
    k, n = q.shape
    return QuantLinear(matmul.outputs[0], x, k, n, "int8", (q, scale.reshape(n).astype(np.float32)),
                       name=matmul.name or matmul.outputs[0].name, int8_activations=x is not a)


def _match_blocked_int4(matmul: ir.Node, dq_w: ir.Node) -> QuantLinear | None:
    """MatMul(x, DequantizeLinear(W int4|uint4 [K, N], scales [G, N][, zero points uint4 [G, N]],
    axis=0, block_size)): quantize{format=qdq}'s int4 weights, the same numbers as MatMulNBits'
    (codes 0..15, code - 8 or code - zero point, times the block's scale) with float x."""
    x, w = matmul.inputs[0], dq_w.inputs[0]
    group = dq_w.attributes.get_int("block_size", 0)
    if not is_int4_dequantize(dq_w) or dq_w.attributes.get_int("axis", 1) != 0:
        return None
    q, scales = _const(w), _const(dq_w.inputs[1])
    zero = _const(dq_w.inputs[2]) if len(dq_w.inputs) > 2 and dq_w.inputs[2] is not None else None
    if q is None or scales is None or q.ndim != 2 or group < 16 or group % 16:
        return None
    k, n = q.shape
    blocks = -(-k // group)
    if scales.shape != (blocks, n) or not _float_input(x) or x.shape[-1] != k:
        return None
    signed = w.dtype == ir.DataType.INT4
    if zero is not None and zero.shape != (blocks, n):
        return None
    offset = 8 if signed else 0  # int4 -8..7 -> codes 0..15, zero points moved the same way
    codes = np.full((n, blocks * group), 8, np.uint8)  # the padding past K: code 8, weight 0 when symmetric
    codes[:, :k] = (q.astype(np.int16) + offset).T.astype(np.uint8)
    zeros = None
    if zero is not None:
        zeros = np.ascontiguousarray((zero.astype(np.int16) + offset).T.astype(np.uint8))
        if np.all(zeros == 8):  # the symmetric form spelled with zero points
            zeros = None
    elif not signed:  # uint4 without zero points: zero point 0
        zeros = np.zeros((n, blocks), np.uint8)
    return QuantLinear(matmul.outputs[0], x, k, n, "int4", (codes, np.ascontiguousarray(scales.T).astype(np.float32),
                                                             zeros), group=group,
                       name=matmul.name or matmul.outputs[0].name)


def _through_activation_qdq(a: ir.Value) -> ir.Value:
    """x for A = DequantizeLinear(QuantizeLinear(x, s, z), s, z) (per-tensor), else A itself."""
    dq = _producer(a, "DequantizeLinear")
    q = _producer(dq.inputs[0], "QuantizeLinear") if dq is not None else None
    if q is None:
        return a
    scales = [_const(node.inputs[1]) for node in (q, dq)]
    if any(s is None or s.size != 1 for s in scales):
        return a
    return q.inputs[0]


def _match_dynamic(mul: ir.Node) -> QuantLinear | None:
    for cast_in, scale_in in (mul.inputs, mul.inputs[::-1]):
        cast = _producer(cast_in, "Cast")
        mm = _producer(cast.inputs[0], "MatMulInteger") if cast is not None else None
        scale_mul = _producer(scale_in, "Mul")
        if mm is None or scale_mul is None:
            continue
        dql = _producer(mm.inputs[0], "DynamicQuantizeLinear")
        if dql is None or len(mm.inputs) < 3 or mm.inputs[2] is not dql.outputs[2]:
            continue
        q = _const(mm.inputs[1])
        w_zero = _const(mm.inputs[3]) if len(mm.inputs) > 3 and mm.inputs[3] is not None else None
        others = [v for v in scale_mul.inputs if v is not dql.outputs[1]]
        if len(others) != 1 or len(scale_mul.inputs) != 2:
            continue
        scale = _const(others[0])
        x = dql.inputs[0]
        if not _int8_weight(q, scale, w_zero) or not _float_input(x) or x.shape[-1] != q.shape[0]:
            continue
        k, n = q.shape
        return QuantLinear(mul.outputs[0], x, k, n, "int8", (q, scale.reshape(n).astype(np.float32)),
                           name=mm.name or mul.outputs[0].name, int8_activations=True)
    return None


def _match_per_token(mul: ir.Node) -> QuantLinear | None:
    """quantize{mode=dynamic,granularity=token}: Mul(Mul(Cast(MatMulInteger(x_q, q)), s), w_scale) with
    x_q = Cast<int8>(Clip(Round(Div(x, s)))) and s the row's max |x| / 127: the symmetric
    per-token rounding the VNNI kernels do themselves (elsewhere x stays float, as for `dynamic`)."""
    for inner, outer_scale in (mul.inputs, mul.inputs[::-1]):
        token_mul, scale = _producer(inner, "Mul"), _const(outer_scale)
        if token_mul is None or scale is None:
            continue
        for cast_in, token_scale in (token_mul.inputs, token_mul.inputs[::-1]):
            cast = _producer(cast_in, "Cast")
            mm = _producer(cast.inputs[0], "MatMulInteger") if cast is not None else None
            if mm is None or any(v is not None for v in mm.inputs[2:]):
                continue
            x = _per_token_source(mm.inputs[0], token_scale)
            q = _const(mm.inputs[1])
            if x is None or not _int8_weight(q, scale, None) or not _float_input(x) or x.shape[-1] != q.shape[0]:
                continue
            k, n = q.shape
            return QuantLinear(mul.outputs[0], x, k, n, "int8", (q, scale.reshape(n).astype(np.float32)),
                               name=mm.name or mul.outputs[0].name, int8_activations=True)
    return None


def _per_token_source(x_q: ir.Value, scale: ir.Value) -> ir.Value | None:
    """x for x_q = Cast<int8>(Clip(Round(Div(x, scale)), -127, 127)) with scale = max(max |x| of
    the row, floor) / 127 (the pass's form, which the kernels round as), else None."""
    cast = _producer(x_q, "Cast")
    clip = _producer(cast.inputs[0], "Clip") if cast is not None else None
    rounded = _producer(clip.inputs[0], "Round") if clip is not None else None
    div = _producer(rounded.inputs[0], "Div") if rounded is not None else None
    if div is None or div.inputs[1] is not scale or x_q.dtype != ir.DataType.INT8 or len(clip.inputs) != 3:
        return None
    if not (_scalar(clip.inputs[1]) == -127 and _scalar(clip.inputs[2]) == 127):
        return None
    x = div.inputs[0]
    return x if _row_absmax_over_127(scale, x) else None


def _scalar(value: ir.Value | None) -> float | None:
    array = _const(value)
    return float(array.reshape(-1)[0]) if array is not None and array.size == 1 else None


def _row_absmax_over_127(scale: ir.Value, x: ir.Value) -> bool:
    """scale = Div(ReduceMax(Abs(x), last axis) [through a Max with a small constant floor], 127)."""
    div = _producer(scale, "Div")
    if div is None or _scalar(div.inputs[1]) != 127:
        return False
    reduced = div.inputs[0]
    floor = _producer(reduced, "Max")
    if floor is not None:  # max(row max, a tiny floor): the floor only matters for an all-zero row
        values = [_scalar(v) for v in floor.inputs]
        kept = [v for v, c in zip(floor.inputs, values) if c is None]
        if len(floor.inputs) != 2 or len(kept) != 1 or not 0 <= max(c for c in values if c is not None) < 1e-3:
            return False
        reduced = kept[0]
    reduce = _producer(reduced, "ReduceMax")
    magnitude = _producer(reduce.inputs[0], "Abs") if reduce is not None else None
    if magnitude is None or magnitude.inputs[0] is not x or x.shape is None:
        return False
    axes = _const(reduce.inputs[1]) if len(reduce.inputs) > 1 and reduce.inputs[1] is not None else None
    axes = list(axes.reshape(-1)) if axes is not None else reduce.attributes.get_ints("axes", None)
    return axes is not None and [int(a) % len(x.shape) for a in axes] == [len(x.shape) - 1]


def _match_matmulnbits(node: ir.Node) -> QuantLinear | None:
    attrs = node.attributes
    if attrs.get_int("bits", 4) != 4 or len(node.inputs) > 4 and any(v is not None for v in node.inputs[4:]):
        return None
    k, n, group = attrs.get_int("K", 0), attrs.get_int("N", 0), attrs.get_int("block_size", 0)
    packed, scales = _const(node.inputs[1]), _const(node.inputs[2])
    zp = _const(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
    x = node.inputs[0]
    if packed is None or scales is None or group < 16 or group % 16 or not _float_input(x) or x.shape[-1] != k:
        return None
    blocks = -(-k // group)
    if packed.dtype != np.uint8 or packed.size != n * blocks * group // 2 or scales.size != n * blocks:
        return None
    if zp is not None and (zp.dtype != np.uint8 or zp.size != n * -(-blocks // 2)):
        return None  # float zero points (a different MatMulNBits form): left to TVM
    codes = unpack_nibbles(packed.reshape(n, blocks * group // 2))
    zeros = None if zp is None else unpack_nibbles(zp.reshape(n, -1))[:, :blocks]
    return QuantLinear(node.outputs[0], x, k, n, "int4",
                       (codes, scales.reshape(n, blocks).astype(np.float32), zeros), group=group,
                       name=node.name or node.outputs[0].name, int8_activations=attrs.get_int("accuracy_level", 0) == 4)


def unpack_nibbles(packed: np.ndarray) -> np.ndarray:
    """uint8 [..., B] -> codes [..., 2B], low nibble first (MatMulNBits' order)."""
    out = np.empty((*packed.shape[:-1], packed.shape[-1] * 2), dtype=np.uint8)
    out[..., 0::2] = packed & 15
    out[..., 1::2] = packed >> 4
    return out


# --------------------------------------------------------------------------- rewriting

def _rows(x: ir.Value) -> int | None:
    dims = list(x.shape)[:-1]
    if not all(isinstance(d, int) for d in dims):
        return None
    return int(np.prod(dims)) if dims else 1


def _zero_producing(node: ir.Node | None) -> bool:
    """x is exactly zero where a ReLU cut it: Relu(.), or Mul(Relu(.), up) in a gated FFN."""
    if node is None:
        return False
    if node.op_type == "Relu":
        return True
    return node.op_type == "Mul" and any(
        v is not None and v.producer() is not None and v.producer().op_type == "Relu" for v in node.inputs)


def _activity(match: QuantLinear) -> tuple[str, list[ir.Value]]:
    """(mode, [x, threshold[, scale]]) for the kernel: sparse when x is sparsified or ReLU-produced."""
    rows = _rows(match.x)
    if rows is None or rows > MAX_SPARSE_ROWS:
        return "dense", [match.x]
    producer = match.x.producer()
    if producer is not None and is_sparsify(producer):
        mode = "scaled" if producer.op_type == SPARSIFY_WEIGHTED else "threshold"
        return mode, list(producer.inputs[: 3 if mode == "scaled" else 2])
    if _zero_producing(producer):
        return "nonzero", [match.x]
    return "dense", [match.x]


def _uses_int8_dot(match: QuantLinear, mode: str, int8_dot: bool) -> bool:
    """Whether the VNNI kernel (x rounded to int8 in the kernel) takes this layer."""
    if not (int8_dot and match.int8_activations):
        return False
    if match.kind == "int4":  # dense at any row count; sparse at batch 1 (prompt chunks: the rows kernel)
        return match.group % 32 == 0 and (mode == "dense" or _rows(match.x) == 1)
    return mode != "dense" and _rows(match.x) == 1


def shared_input_batches(matches: list[QuantLinear], int8_dot: bool) -> list[list[QuantLinear]]:
    """``matches`` in batches, in graph order: layers that take a one-row VNNI sparse kernel and
    read the same input with the same activity test (one Sparsify output: q/k/v, gate/up) share
    a batch; every other layer is a batch of one."""
    batches: dict[tuple, list[QuantLinear]] = {}
    for match in matches:
        mode, inputs = _activity(match)
        key: tuple = (id(match),)
        if mode != "dense" and _uses_int8_dot(match, mode, int8_dot):
            key = (match.kind, match.group, match.weights[2] is not None if match.kind == "int4" else False,
                   mode, *(id(value) for value in inputs))
        batches.setdefault(key, []).append(match)
    return list(batches.values())


def _packed_weights(match: QuantLinear, sparse: bool, lanes: int, vnni: bool = False) -> list[np.ndarray]:
    from actsparse.codegen.kernels.cpu import quant

    if match.kind == "int8":
        q, scale = match.weights
        if vnni:
            return list(quant.pack_int8_sparse_vnni(q, scale))
        pack = quant.pack_int8_sparse if sparse else quant.pack_int8_dense
        return list(pack(q, scale, lanes))
    codes, scales, zeros = match.weights
    if vnni and sparse:
        return list(quant.pack_int4_sparse_vnni(codes, scales, zeros, k=match.k))
    if vnni:
        return list(quant.pack_int4_dense_vnni(codes, scales, zeros, k=match.k, group=match.group))
    pack = quant.pack_int4_sparse if sparse else quant.pack_int4_dense
    return list(pack(codes, scales, zeros, k=match.k, lanes=lanes))


def _replace(model: ir.Model, batch: list[QuantLinear], lanes: int, int8_dot: bool = False) -> list[dict]:
    """One ActsparseQuantLinear node for ``batch`` (one layer, or layers side by side over the
    same input: their weights concatenated along the output columns, then packed as one), then
    one Slice per layer of a batch of several."""
    match = batch[0]
    mode, inputs = _activity(match)
    vnni = _uses_int8_dot(match, mode, int8_dot)
    whole = match if len(batch) == 1 else _side_by_side(batch)
    base = match.name or "quant_linear"
    for suffix, array in zip(("weight", "scale", "zero"), _packed_weights(whole, mode != "dense", lanes, vnni)):
        inputs.append(add_initializer(model, f"{base}.{suffix}_{match.kind}_packed", array))
    zero_points = match.kind == "int4" and match.weights[2] is not None
    n = whole.n
    attributes = {"kind": match.kind, "mode": mode, "k": match.k, "n": n, "group": match.group,
                  "zero_points": int(zero_points), "lanes": lanes, "int8_dot": int(vnni), "layer": match.name or ""}
    if len(batch) > 1:  # the parts: the layers' names, their columns and where they start
        attributes |= {"layers": [m.name or "" for m in batch], "parts": [m.n for m in batch],
                       "offsets": [int(o) for o in np.cumsum([0, *[m.n for m in batch[:-1]]])]}
    node = ir.Node(LOWERING_DOMAIN, QUANT_LINEAR, inputs,
                   attributes=ir.convenience.convert_attributes(attributes),
                   name=unique_node_name(model, f"{base}.kernel"))
    out = node.outputs[0]
    out.type = match.output.type
    out.shape = match.output.shape if len(batch) == 1 else ir.Shape([*list(match.output.shape)[:-1], n])
    model.graph.insert_before(match.output.producer(), node)
    if len(batch) == 1:
        _take_over(model, match.output, out)
    else:
        for m, offset in zip(batch, attributes["offsets"]):
            bounds = [add_initializer(model, f"{m.name or base}.part_{role}", np.array([value], np.int64))
                      for role, value in (("start", offset), ("end", offset + m.n), ("axis", -1))]
            part = ir.Node("", "Slice", [out, *bounds], name=unique_node_name(model, f"{m.name or base}.part"))
            part.outputs[0].type, part.outputs[0].shape = m.output.type, m.output.shape
            model.graph.insert_before(match.output.producer(), part)
            _take_over(model, m.output, part.outputs[0])
    kernel = f"{match.kind}_{'dense' if mode == 'dense' else 'sparse_' + mode}{'_vnni' if vnni else ''}"
    return [{"name": m.name, "kernel": kernel, "shape": [m.k, m.n]} for m in batch]


def _side_by_side(batch: list[QuantLinear]) -> QuantLinear:
    """One QuantLinear whose output columns are the batch's, in order (packed once: only the
    whole gets padded to the kernel's block)."""
    first = batch[0]
    if first.kind == "int8":  # q [K, N], scale [N]
        weights = (np.concatenate([m.weights[0] for m in batch], axis=1),
                   np.concatenate([m.weights[1] for m in batch]))
    else:  # codes [N, Kp], scales [N, G], zeros [N, G] or None
        zeros = None if first.weights[2] is None else np.concatenate([m.weights[2] for m in batch])
        weights = (np.concatenate([m.weights[0] for m in batch]), np.concatenate([m.weights[1] for m in batch]), zeros)
    return QuantLinear(first.output, first.x, first.k, sum(m.n for m in batch), first.kind, weights,
                       group=first.group, name=first.name, int8_activations=first.int8_activations)


def _take_over(model: ir.Model, old: ir.Value, new: ir.Value) -> None:
    """Every use of ``old`` reads ``new``; a graph output keeps its name."""
    name = old.name
    ir.convenience.replace_all_uses_with(old, new, replace_graph_outputs=True)
    if any(v is new for v in model.graph.outputs):
        old.name = f"{name}_replaced"
        new.name = name


# ------------------------------------------------------------------------------ TVM import

def quant_converters(target: TargetInfo) -> dict:
    """from_onnx converters for ActsparseQuantLinear (one PrimFunc per variant and shape)."""
    return {QUANT_LINEAR: _converter(describe_target(target).row_schedule)}  # a TargetInfo stays as it is


def quant_kernel(kind: str, mode: str, m: int, k: int, n: int, group: int, zero_points: bool, lanes: int,
                 int8_dot: bool = False, schedule=None):
    """The PrimFunc an ActsparseQuantLinear node calls."""
    from actsparse.codegen.kernels.cpu import quant

    if int8_dot and kind == "int4" and mode == "dense":
        return quant.int4_dense_matmul_vnni(m, k, n, group, zero_points=zero_points)
    if int8_dot and m > 1:  # a prompt chunk over the one-row kernel's weights: every input counts
        if mode != "nonzero":
            raise ValueError(f"the multi-row VNNI kernels read every input, not mode {mode!r}")
        if kind == "int4":
            return quant.int4_vnni_rows_matmul(m, k, n, group, zero_points=zero_points)
        return quant.int8_vnni_rows_matmul(m, k, n)
    if int8_dot and kind == "int4":
        return quant.int4_sparse_matmul_vnni(k, n, group, mode, zero_points=zero_points)
    if int8_dot:
        return quant.int8_sparse_matmul_vnni(k, n, mode)
    if kind == "int8":
        if mode == "dense":
            return quant.int8_dense_matmul(m, k, n, lanes=lanes)
        return quant.int8_sparse_matmul(m, k, n, mode, lanes=lanes, schedule=schedule or quant.X86_ROWS)
    if mode == "dense":
        return quant.int4_dense_matmul(m, k, n, group, zero_points=zero_points, lanes=lanes)
    return quant.int4_sparse_matmul(m, k, n, group, mode, zero_points=zero_points, lanes=lanes)


def _converter(schedule):
    from tvm import relax

    functions: dict[tuple, object] = {}

    def convert(bb, inputs, attrs, params):
        kind, mode = attr_text(attrs["kind"]), attr_text(attrs["mode"])
        k, n, group = int(attrs["k"]), int(attrs["n"]), int(attrs["group"])
        zero_points, lanes = bool(attrs["zero_points"]), int(attrs["lanes"])
        int8_dot = bool(attrs.get("int8_dot", 0))
        x = inputs[0]
        shape = [int(d) for d in x.ty.shape]
        m = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        x2 = bb.emit(relax.op.reshape(x, (m, k))) if shape != [m, k] else x
        rest = list(inputs[1:])
        if mode in ("threshold", "scaled"):  # the kernel takes the scalar threshold as f32[1]
            rest[0] = bb.emit(relax.op.reshape(rest[0], (1,)))
        key = (kind, mode, m, k, n, group, zero_points, lanes, int8_dot)
        if key not in functions:
            symbol = f"actsparse_{kind}_{mode}_m{m}_k{k}_n{n}" + (f"_g{group}{'_zp' if zero_points else ''}"
                                                                 if kind == "int4" else "") + ("_vnni" if int8_dot else "")
            func = quant_kernel(*key, schedule=schedule)
            functions[key] = bb.add_func(func.with_attr("global_symbol", symbol), symbol)
        y = bb.emit(relax.call_tir(functions[key], [x2, *rest], relax.TensorType((m, n), "float32")))
        return relax.op.reshape(y, (*shape[:-1], n)) if shape != [m, k] else y

    return as_converter(convert)
