"""Fuse a gated FFN block (SwiGLU and its sparse forms) into ONE kernel node at batch-1 decode.

A gated FFN is three linears and a few elementwise ops,

    y = down(act(gate(x)) * up(x))

At M == 1 (one token) one fused kernel can decide which weight rows it needs before it reads
them, so up and down skip the rows of inactive neurons. The patterns (after `specialize_shapes`):

    relufy (act=relu / shifted_relu), no sparsify:
        Relu(gate(x) [- b]) * up(x) -> down        => ffn_gate_sparse(act=relu[, shift=b], threshold=0)
    CATS (sparsify method=cats):
        Sparsify(silu(gate(x)), t) * up(x) -> down => ffn_gate_sparse(act=silu, threshold=t)
    TEAL (sparsify method=teal, scope=ffn):
        xs = Sparsify(x, t_in); Sparsify(silu(gate(xs)) * up(xs), t_down) -> down
                                                   => ffn_input_sparse(t_in, t_down)
    dense SwiGLU (no sparsity):
        silu(gate(x)) * up(x) -> down [+ x]        => ffn_dense (gate and up as one panel GEMV; a
                                                      residual Add of x is folded into its output)
    predictor (passes/predictor.py, on a relufied or plain gated FFN):
        (act(gate(x) [- b]) * up(x)) * PredictActive*(x, A, B, bias, p) -> down
                                                   => predict_active(mode) then ffn_indexed
       The predictor's low-rank logits, its selection (threshold / top-k / statistical) and
       the compaction of the mask into idx/nnz are one kernel (`predict_active`: no mask
       tensor in between); ffn_indexed then reads the gate, up and down rows of idx only.

TEAL: measured on the 4-layer D=1024 F=2816 stack at 50 % (benchmarks/bench_ffn.py, 2 busy
cores, interleaved blocks), the fused kernel beat the per-linear sparse kernels in every run
(best 4.96 vs 7.10 ms), so both forms are on by default; `fuse_ffn_blocks(model, forms)` (and
`compile_model(..., fused_ffn_forms=)`) switches them for comparisons. WINA (SparsifyWeighted)
keeps the per-linear kernels.

The block is replaced by one node `actsparse.lowering.ActsparseFusedFFN` (attributes: kernel,
act, d, f); its weights are packed here, once, by the kernels' ``pack_*`` functions. The
converter (`fused_ffn_converters`) turns the node into a `call_tir` of the kernel.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from actsparse.codegen.lowering.ops import FUSED_FFN, LOWERING_DOMAIN, as_converter, attr_text, declare_lowering_domain
from actsparse.codegen.targets import TargetInfo
from actsparse.ir.activations import match_activation
from actsparse.ir.blocks import Linear, find_blocks, find_linears, predicted_mask_input
from actsparse.ir.custom_ops import PREDICTOR_MODES, SPARSIFY, add_initializer, is_sparsify, unique_node_name
from actsparse.ir.large import drop_pages

GATE_SPARSE = "ffn_gate_sparse"
INPUT_SPARSE = "ffn_input_sparse"
INDEXED = "ffn_indexed"
DENSE = "ffn_dense"
FORMS = (GATE_SPARSE, INPUT_SPARSE, INDEXED, DENSE)
DEFAULT_FORMS = frozenset(FORMS)
CUDA_FORMS = frozenset({GATE_SPARSE, INPUT_SPARSE})  # the fused FFN kernels with a CUDA version


def fused_forms(forms) -> frozenset[str]:
    """`forms` as a set, every one of them known (benchmarks compare fused with per-linear kernels)."""
    unknown = set(forms) - set(FORMS)
    if unknown:
        raise ValueError(f"unknown fused FFN forms {sorted(unknown)}; known: {FORMS}")
    return frozenset(forms)


@dataclass(eq=False)
class GatedFFN:
    """A matched gated FFN: y = down(act(gate(xs) [- shift]) [sparsified at cats_t] * up(xs)) with
    xs = x or Sparsify(x, t_in), the down input sparsified at t_down when given."""

    gate: Linear
    up: Linear
    down: Linear
    x: ir.Value
    act: str
    shift: float | None = None
    cats_threshold: float | None = None
    input_threshold: float | None = None
    down_threshold: float | None = None
    weighted: bool = False  # a SparsifyWeighted (WINA) sits in the block
    nodes: set[ir.Node] = field(default_factory=set)  # every node the fused kernel replaces
    predictor: ir.Node | None = None  # the actsparse.PredictActive* op whose mask multiplies the hidden
    residual: ir.Node | None = None  # Add(x, down(...)) folded into the kernel (ffn_dense only)

    @property
    def output(self) -> ir.Value:
        """The value the fused node takes over: the residual Add's output when folded, else down's."""
        return self.residual.outputs[0] if self.residual is not None else self.down.output

    def form(self) -> str | None:
        """The fused kernel this block fits, or None (it keeps per-linear kernels)."""
        if self.weighted:
            return None
        thresholds = (self.input_threshold, self.down_threshold)
        if self.predictor is not None:
            plain = self.cats_threshold is None and thresholds == (None, None)
            fits = plain and self.predictor.inputs[0] is self.x and _predictor_constants(self.predictor) is not None
            return INDEXED if fits and (self.act == "relu" or self.shift is None) else None
        if self.act == "relu" and self.cats_threshold is None and thresholds == (None, None):
            return GATE_SPARSE
        if self.act == "silu" and self.shift is None and self.cats_threshold is not None and thresholds == (None, None):
            return GATE_SPARSE
        if self.act == "silu" and self.shift is None and self.cats_threshold is None and None not in thresholds:
            return INPUT_SPARSE
        if self.act == "silu" and self.shift is None and self.cats_threshold is None and thresholds == (None, None):
            return DENSE
        return None


def fuse_ffn_blocks(model: ir.Model, forms=DEFAULT_FORMS) -> list[dict]:
    """Replace every gated FFN block that fits one of the fused kernels `forms` (at M == 1) by
    one ActsparseFusedFFN node, in place. Returns the kernel-plan entries of the fused blocks."""
    import onnx_ir.passes.common as common

    forms = fused_forms(forms)

    names = _block_names(model)
    linears = find_linears(model)
    by_output = {lin.output: lin for lin in linears}
    matched = []  # all matched on the unmodified graph: a replacement changes the values later blocks read
    for down in linears:
        block = match_gated_ffn(down, by_output)
        if block is None:
            continue
        form = block.form()
        if form is None or form not in forms or not _single_token(block.x) or not _self_contained(block):
            continue
        if form == DENSE:
            block.residual = _residual_add(block)
        matched.append((block, form))
    plan = []
    replaced: dict[ir.Value, ir.Value] = {}  # a replaced block's output -> the fused node's output
    for block, form in matched:
        block.x = replaced.get(block.x, block.x)  # blocks back to back: the previous one's output
        name = names.get(block.down.node) or _common_prefix([block.gate.name, block.up.name, block.down.name])
        entry, fused_output = _replace(model, block, form, name)
        replaced[block.output] = fused_output
        plan.append(entry)
    if plan:
        common.RemoveUnusedNodesPass()(model)
        declare_lowering_domain(model)
    return plan


# ------------------------------------------------------------------------------ matching

def match_gated_ffn(down: Linear, by_output: dict[ir.Value, Linear]) -> GatedFFN | None:
    """The gated FFN ending in `down`, in one of the forms of the module docstring, else None."""
    if not _plain(down):
        return None
    nodes = {down.node}
    hidden, down_threshold, weighted = _through_sparsify(down.input, nodes)
    predictor = None
    mask_mul = hidden.producer()
    masked = predicted_mask_input(mask_mul) if mask_mul is not None else None
    if masked is not None:
        predictor = next(v.producer() for v in mask_mul.inputs if v is not masked)
        nodes |= {mask_mul, predictor}
        hidden = masked
    mul = hidden.producer()
    if mul is None or mul.op_type != "Mul" or mul.domain not in ("", "ai.onnx") or len(mul.inputs) != 2:
        return None
    nodes.add(mul)
    for act_side, up_side in (mul.inputs, reversed(mul.inputs)):
        up = by_output.get(up_side)
        gated = _gate_side(act_side, by_output) if up is not None and _plain(up) else None
        if gated is None:
            continue
        gate, act, shift, cats, act_nodes, cats_weighted = gated
        if gate is up or gate.input is not up.input or not _plain(gate):
            continue
        x, input_threshold, input_weighted = _through_sparsify(up.input, set())
        d, f = up.in_features, up.out_features
        if (gate.in_features, gate.out_features, down.in_features, down.out_features) != (d, f, f, d):
            continue
        return GatedFFN(gate, up, down, x, act, shift, cats, input_threshold, down_threshold,
                        weighted or cats_weighted or input_weighted,
                        nodes | act_nodes | {gate.node, up.node}, predictor)
    return None


def _gate_side(value: ir.Value, by_output):
    """act(gate(x)) in the forms we fuse: (gate, act, shift, cats threshold, nodes, weighted) or None."""
    nodes: set[ir.Node] = set()
    value, cats, weighted = _through_sparsify(value, nodes)
    producer = value.producer()
    if producer is None:
        return None
    if producer.op_type == "Relu" and producer.domain in ("", "ai.onnx"):
        nodes.add(producer)
        pre = producer.inputs[0]
        shift = None
        sub = pre.producer()
        if pre not in by_output and sub is not None and sub.op_type == "Sub" and sub.domain in ("", "ai.onnx"):
            shift = _scalar(sub.inputs[1])
            if shift is None:
                return None
            nodes.add(sub)
            pre = sub.inputs[0]
        gate = by_output.get(pre)
        return None if gate is None else (gate, "relu", shift, cats, nodes, weighted)
    activation = match_activation(value)
    if activation is None or activation.kind != "silu":
        return None
    gate = by_output.get(activation.input)
    return None if gate is None else (gate, "silu", None, cats, nodes | set(activation.nodes), weighted)


def _through_sparsify(value: ir.Value, nodes: set[ir.Node]) -> tuple[ir.Value, float | None, bool]:
    """(dense value, threshold of a plain Sparsify on it or None, whether a SparsifyWeighted is there)."""
    producer = value.producer()
    if producer is None or not is_sparsify(producer):
        return value, None, False
    nodes.add(producer)
    if producer.op_type != SPARSIFY:
        return producer.inputs[0], None, True
    threshold = _scalar(producer.inputs[1])
    if threshold is None:  # a threshold given at run time: not a constant we can fold
        return producer.inputs[0], None, True
    return producer.inputs[0], threshold, False


def _predictor_constants(node: ir.Node) -> tuple[str, np.ndarray, np.ndarray, np.ndarray, float] | None:
    """(mode, A [D, r], B [r, F], bias [F], parameter) of a PredictActive* op whose operands are
    constants, else None."""
    mode = PREDICTOR_MODES.get(node.op_type)
    if mode is None or len(node.inputs) != 5:
        return None
    arrays = []
    for value in node.inputs[1:4]:
        tensor = None if value is None or value.is_graph_input() else value.const_value
        if tensor is None:
            return None
        arrays.append(tensor.numpy().astype(np.float32))
    param = _scalar(node.inputs[4])
    a, b, bias = arrays
    if param is None or a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0] or bias.size != b.shape[1]:
        return None
    return mode, a, b, bias.reshape(-1), param


def _plain(linear: Linear) -> bool:
    """A bias-free float32 MatMul with the constant 2-D weight on the right."""
    w = linear.weight.const_value
    return (linear.node.op_type == "MatMul" and linear.bias is None and w is not None
            and w.dtype == ir.DataType.FLOAT and len(w.shape) == 2 and linear.node.inputs[0] is linear.input)


def _scalar(value: ir.Value | None) -> float | None:
    if value is None or value.is_graph_input():
        return None
    try:
        tensor = ir.convenience.get_const_tensor(value)
    except ValueError:
        return None
    if tensor is None or tensor.size != 1:
        return None
    return float(tensor.numpy().reshape(()))


def _single_token(x: ir.Value) -> bool:
    """The fused kernels take x: [1, D] (batch-1 decode); [1, 1, D] reshapes to that."""
    shape = x.shape
    return (shape is not None and len(shape) >= 1 and all(isinstance(dim, int) for dim in shape)
            and int(np.prod(shape[:-1], dtype=np.int64)) == 1)


def _self_contained(block: GatedFFN) -> bool:
    """No value inside the block (gate, up, hidden, ...) is read outside it or is a graph output,
    so replacing the block drops all of them."""
    for node in block.nodes:
        if node is block.down.node:
            continue
        for out in node.outputs:
            if out.is_graph_output() or any(use.node not in block.nodes for use in out.uses()):
                return False
    return True


def _residual_add(block: GatedFFN) -> ir.Node | None:
    """The Add(x, down(...)) of a pre-norm-free residual block, when down's output feeds only it
    and both operands have x's static shape (no broadcast), else None."""
    out = block.down.output
    uses = list(out.uses())
    if out.is_graph_output() or len(uses) != 1:
        return None
    add = uses[0].node
    if add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(add.inputs) != 2:
        return None
    other = add.inputs[1] if add.inputs[0] is out else add.inputs[0]
    same_shape = other.shape is not None and out.shape is not None and list(other.shape) == list(out.shape)
    return add if other is block.x and same_shape else None


def _block_names(model: ir.Model) -> dict[ir.Node, str]:
    return {block.down.node: block.name for block in find_blocks(model).ffn}


def _common_prefix(names: list[str]) -> str:
    parts = [name.split(".") for name in names]
    common = []
    for pieces in zip(*parts):
        if len(set(pieces)) != 1:
            break
        common.append(pieces[0])
    return ".".join(common) or names[-1]


# ------------------------------------------------------------------------------ rewriting

def _replace(model: ir.Model, block: GatedFFN, form: str, name: str) -> tuple[dict, ir.Value]:
    """Insert the fused node in place of `block`: (its kernel-plan entry, its output)."""
    from actsparse.codegen.kernels.cpu.ffn import (pack_ffn_dense, pack_ffn_gate_sparse, pack_ffn_indexed,
                                                   pack_ffn_input_sparse, pack_predictor)

    wg, wu, wd = (np.ascontiguousarray(lin.weight_array("KN"), dtype=np.float32)
                  for lin in (block.gate, block.up, block.down))
    d, f = wg.shape

    def scalar(suffix: str, value: float) -> ir.Value:
        return add_initializer(model, f"{name}.{suffix}", np.array([value], dtype=np.float32))

    entry = {"name": name, "kernel": form, "act": block.act, "shape": [d, f],
             "linears": [block.gate.name, block.up.name, block.down.name]}
    if form == GATE_SPARSE:
        threshold = block.cats_threshold if block.cats_threshold is not None else 0.0
        packed = pack_ffn_gate_sparse(wg, wu, wd)
        inputs = [block.x, scalar("threshold", threshold)]
        if block.shift is not None:
            inputs.append(scalar("shift", block.shift))
            entry["shift"] = block.shift
        entry["threshold"] = threshold
        weight_names = ("gate_packed", "up_t", "down")
    elif form == INDEXED:
        mode, a, b, bias, param = _predictor_constants(block.predictor)
        a_packed, b_packed = pack_predictor(a, b)
        param_array = np.array([int(param)], np.int32) if mode == "topk" else np.array([param], np.float32)
        inputs = [block.x, add_initializer(model, f"{name}.predictor_a", a_packed),
                  add_initializer(model, f"{name}.predictor_b", b_packed),
                  add_initializer(model, f"{name}.predictor_bias", bias),
                  add_initializer(model, f"{name}.predictor_param", param_array)]
        if block.shift is not None:
            inputs.append(scalar("shift", block.shift))
            entry["shift"] = block.shift
        entry["predictor"] = {"mode": mode, "rank": int(a.shape[1]), "parameter": param}
        packed = pack_ffn_indexed(wg, wu, wd)
        weight_names = ("gate_up_t", "down")
    elif form == DENSE:
        packed = pack_ffn_dense(wg, wu, wd)  # the converter reads the panel width back
        inputs = [block.x]
        weight_names = ("gate_up_panels", "down_panels")
    else:
        packed = pack_ffn_input_sparse(wg, wu, wd)
        inputs = [block.x, scalar("input_threshold", block.input_threshold),
                  scalar("down_threshold", block.down_threshold)]
        entry |= {"input_threshold": block.input_threshold, "down_threshold": block.down_threshold}
        weight_names = ("gate_up", "down")
    inputs += [add_initializer(model, f"{name}.{suffix}", array) for suffix, array in zip(weight_names, packed)]
    for array in (wg, wu, wd):  # packed copies replace them: mapped external data need not stay resident
        drop_pages(array)
    attributes = {"kernel": ir.AttrString("kernel", form), "act": ir.AttrString("act", block.act),
                  "d": ir.AttrInt64("d", d), "f": ir.AttrInt64("f", f),
                  "shifted": ir.AttrInt64("shifted", int(block.shift is not None)),
                  "residual": ir.AttrInt64("residual", int(block.residual is not None)),
                  "linears": ir.AttrStrings("linears", entry["linears"])}
    if block.residual is not None:
        entry["residual"] = True
    if form == INDEXED:
        attributes["mode"] = ir.AttrString("mode", entry["predictor"]["mode"])
        attributes["rank"] = ir.AttrInt64("rank", entry["predictor"]["rank"])
    node = ir.Node(LOWERING_DOMAIN, FUSED_FFN, inputs, attributes=attributes,
                   name=unique_node_name(model, f"{name}.fused_ffn"))
    out = block.output
    node.outputs[0].type, node.outputs[0].shape = out.type, out.shape
    model.graph.insert_before(block.down.node, node)
    output_name = out.name if out.is_graph_output() else None
    ir.convenience.replace_all_uses_with(out, node.outputs[0], replace_graph_outputs=True)
    if output_name:  # the model keeps its output names
        out.name = f"{output_name}.replaced"
        node.outputs[0].name = output_name
    return entry, node.outputs[0]


# ------------------------------------------------------------------------------ TVM import

def fused_ffn_converters(target: TargetInfo) -> dict:
    """from_onnx converters for ActsparseFusedFFN (one PrimFunc per kernel variant and shape)."""
    return {FUSED_FFN: _converter(target)}


def _converter(target: TargetInfo):
    from tvm import relax

    from actsparse.codegen.kernels.cpu.ffn import (ffn_dense, ffn_gate_sparse, ffn_indexed, ffn_input_sparse,
                                                   predict_active)

    functions: dict[tuple, object] = {}
    schedule = target.row_schedule

    def kernel(bb, form: str, act: str, d: int, f: int, shifted: bool, lanes: int, residual: bool = False):
        key = (form, act, d, f, shifted, lanes, residual)
        if key not in functions:
            if form == GATE_SPARSE:
                func = ffn_gate_sparse(d, f, act, lanes=lanes, shifted=shifted, schedule=schedule)
            elif form == INDEXED:
                func = ffn_indexed(d, f, act, lanes=lanes, shifted=shifted, schedule=schedule)
            elif form == DENSE:
                func = ffn_dense(d, f, act, lanes=lanes, residual=residual, schedule=schedule)
            else:
                func = ffn_input_sparse(d, f, act, lanes=lanes, schedule=schedule)
            symbol = f"actsparse_{form}_{act}{'_shifted' if shifted else ''}{'_residual' if residual else ''}_d{d}_f{f}"
            functions[key] = bb.add_func(func.with_attr("global_symbol", symbol), symbol)
        return functions[key]

    def predictor(bb, mode: str, d: int, rank: int, f: int, lanes: int):
        key = ("predict_active", mode, d, rank, f, lanes)
        if key not in functions:
            symbol = f"actsparse_predict_active_{mode}_d{d}_r{rank}_f{f}"
            func = predict_active(d, rank, f, mode, lanes=lanes, schedule=schedule)
            functions[key] = bb.add_func(func.with_attr("global_symbol", symbol), symbol)
        return functions[key]

    def predicted_ffn(bb, x2, rest, attrs, act: str, d: int, f: int, shifted: bool):
        """predict_active -> (idx, nnz) -> ffn_indexed."""
        mode, rank = attr_text(attrs["mode"]), int(attrs["rank"])
        a, b, bias, param = rest[:4]
        lanes = int(a.ty.shape[2]) // 2  # the predictor panels were packed 2 x lanes wide
        selected = bb.emit(relax.call_tir(predictor(bb, mode, d, rank, f, lanes),
                                          [x2, a, b, bias, bb.emit(relax.op.reshape(param, (1,)))],
                                          [relax.TensorType((f,), "int32"), relax.TensorType((1,), "int32")]))
        shift = [bb.emit(relax.op.reshape(rest[4], (1,)))] if shifted else []
        func = kernel(bb, INDEXED, act, d, f, shifted, target.vector_lanes)
        args = [x2, bb.emit(relax.TupleGetItem(selected, 0)), bb.emit(relax.TupleGetItem(selected, 1)), *shift,
                *rest[4 + int(shifted):]]
        return bb.emit(relax.call_tir(func, args, relax.TensorType((1, d), "float32")))

    def convert(bb, inputs, attrs, params):
        form, act = attr_text(attrs["kernel"]), attr_text(attrs["act"])
        d, f, shifted = int(attrs["d"]), int(attrs["f"]), bool(attrs.get("shifted", 0))
        x = inputs[0]
        shape = [int(dim) for dim in x.ty.shape]
        x2 = bb.emit(relax.op.reshape(x, (1, d))) if shape != [1, d] else x
        if form == INDEXED:
            y = predicted_ffn(bb, x2, list(inputs[1:]), attrs, act, d, f, shifted)
            return relax.op.reshape(y, shape) if shape != [1, d] else y
        scalars = {GATE_SPARSE: 1 + int(shifted), DENSE: 0}.get(form, 2)
        rest = [bb.emit(relax.op.reshape(v, (1,))) for v in inputs[1:1 + scalars]] + list(inputs[1 + scalars:])
        # The gate panels were packed with a fixed width (2 x lanes): the kernel follows it.
        lanes = int(rest[scalars].ty.shape[2]) // 2 if form in (GATE_SPARSE, DENSE) else target.vector_lanes
        func = kernel(bb, form, act, d, f, shifted, lanes, bool(attrs.get("residual", 0)))
        y = bb.emit(relax.call_tir(func, [x2, *rest], relax.TensorType((1, d), "float32")))
        return relax.op.reshape(y, shape) if shape != [1, d] else y

    return as_converter(convert)
