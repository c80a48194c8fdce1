"""Import the kernel-selected ONNX graph into TVM Relax: `from_onnx`, with converters that emit
`call_tir` into our TIR kernels for the `actsparse.lowering` nodes (and a bounds-safe Gather).
This is the one place that patches TVM's converter map, and only while importing.
"""

from __future__ import annotations

import contextlib

import numpy as np
import onnx
import onnx.inliner
import onnx_ir as ir

from actsparse.codegen.relax_util import weights_as_params
from actsparse.codegen.targets import TargetInfo
from actsparse.errors import ActsparseError
from actsparse.ir.custom_ops import add_initializer, unique_node_name
from actsparse.ir.large import weightless_proto

def import_onnx(model: ir.Model, target: TargetInfo):
    """`model` (kernel nodes selected, weights packed) as a Relax IRModule and its params."""
    from tvm.relax.frontend import detach_params
    from tvm.relax.frontend.onnx import from_onnx

    proto, weights = weightless_proto(model)  # weights stay arrays, out of the protobuf (2 GB cap, copies)
    proto = onnx.inliner.inline_local_functions(proto)
    _small_constants_inline(proto.graph)
    with _our_converters(target):
        try:
            mod = from_onnx(proto, keep_params_in_input=True, sanitize_input_names=False)
        except Exception as exc:
            from actsparse.codegen.relax_util import tvm_error_summary

            raise ActsparseError(f"TVM cannot import the model: {tvm_error_summary(exc)}") from None
    return weights_as_params(*detach_params(mod), weights)


_VARIADIC_OPS = ("Sum", "Max", "Min", "Mean")
_VARIADIC_FAN_IN = 8  # above this many inputs, a variadic op becomes a balanced tree


def balance_variadic_ops(model: ir.Model) -> int:
    """Sum / Max / Min / Mean of many inputs -> a balanced tree of two-input nodes (Mean: a Sum
    tree, then a division by the count). TVM imports a variadic node as a chain, one level per
    input, and its recursive passes overflowed the stack on a 10,000-input Sum (SIGSEGV, nothing
    on stderr); a tree is log2(n) deep. Returns the number of nodes rewritten."""
    rewritten = 0
    for node in list(model.graph):
        if node.domain not in ("", "ai.onnx") or node.op_type not in _VARIADIC_OPS or len(node.inputs) <= _VARIADIC_FAN_IN:
            continue
        op = "Sum" if node.op_type == "Mean" else node.op_type
        level = list(node.inputs)
        depth = 0
        while len(level) > 1:
            paired = []
            for i in range(0, len(level) - 1, 2):
                pair = ir.Node("", op, [level[i], level[i + 1]], name=unique_node_name(model, f"{node.name}/tree{depth}"))
                model.graph.insert_before(node, pair)
                paired.append(pair.outputs[0])
            if len(level) % 2:
                paired.append(level[-1])
            level, depth = paired, depth + 1
        result = level[0]
        if node.op_type == "Mean":
            count = add_initializer(model, f"{node.name}.count", np.array(len(node.inputs), np.float32))
            divide = ir.Node("", "Div", [result, count], name=unique_node_name(model, f"{node.name}/mean"))
            model.graph.insert_before(node, divide)
            result = divide.outputs[0]
        output = node.outputs[0]
        result.shape, result.type = output.shape, output.type
        name = output.name
        ir.convenience.replace_all_uses_with(output, result, replace_graph_outputs=True)
        model.graph.remove(node, safe=False)
        output.name, result.name = f"{name}.replaced", name
        rewritten += 1
    return rewritten


def _small_constants_inline(graph: onnx.GraphProto) -> None:
    """Turn scalar and small integer initializers into Constant nodes, so TVM compiles them in.

    As parameters of `main` (keep_params_in_input) TVM cannot see their values: the shape
    operand of an Expand or Reshape then makes every later shape symbolic, and LLVM took
    ~90 s per symbolic reshape (tiny Llama, GQA repeat_kv). 0-d ones would also be 0-d
    parameters. Compiled in, they cost nothing; the parameter file keeps the real weights.
    """
    inputs = {value.name for value in graph.input}

    def inline(t: onnx.TensorProto) -> bool:
        size = int(np.prod(t.dims)) if len(t.dims) else 1
        small_int = t.data_type in _INTEGER_TYPES and size <= _INLINE_INT_LIMIT
        return t.name not in inputs and (len(t.dims) == 0 or small_int)

    chosen = [t for t in graph.initializer if inline(t)]
    if not chosen:
        return
    kept = [t for t in graph.initializer if not inline(t)]
    constants = [onnx.helper.make_node("Constant", [], [t.name], value=t) for t in chosen]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes = constants + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)


_INTEGER_TYPES = {onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.INT8, onnx.TensorProto.UINT8,
                  onnx.TensorProto.BOOL}


_INLINE_INT_LIMIT = 1 << 16  # elements; shapes, axes, position ids and masks, never weights


@contextlib.contextmanager
def _our_converters(target: TargetInfo):
    """While importing, TVM's converter map has our kernel nodes' converters and the clipped Gather."""
    from tvm.relax.frontend.onnx import onnx_frontend

    from actsparse.codegen.kv_cache import kv_converters
    from actsparse.codegen.lowering.ffn_fusion import fused_ffn_converters
    from actsparse.codegen.lowering.prefill import prefill_converters
    from actsparse.codegen.lowering.quant import quant_converters
    from actsparse.codegen.lowering.rsparse import rank_sparse_converters
    from actsparse.codegen.lowering.select import linear_converters

    original = onnx_frontend._get_convert_map
    ours = (fused_ffn_converters(target) | quant_converters(target) | kv_converters(target)
            | rank_sparse_converters(target) | prefill_converters(target))
    linears = linear_converters(target)

    def extended():
        table = dict(original()) | ours
        table["Gather"] = _clipped_gather(table["Gather"])
        return table | linears

    onnx_frontend._get_convert_map = extended
    try:
        yield
    finally:
        onnx_frontend._get_convert_map = original


def _clipped_gather(base):
    """TVM's Gather converter with out-of-range indices clipped instead of read out of bounds:
    TVM's default ("fast") take reads any address an index names (an embedding row, a rotary
    table row), so a bad token id or position would crash the process, not raise."""
    from tvm import relax

    class ClippedGather(base):
        @classmethod
        def _impl_v13(cls, bb, inputs, attr, params):
            original_take = relax.op.take
            relax.op.take = lambda data, indices, axis=None, mode="fast": original_take(data, indices, axis, mode="clip")
            try:
                return super()._impl_v13(bb, inputs, attr, params)
            finally:
                relax.op.take = original_take

    return ClippedGather
