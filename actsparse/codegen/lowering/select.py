"""Kernel selection: every linear layer of the (shape-specialized) ONNX graph gets a kernel node.

    Sparsify(x, t[, s]) -> MatMul(., W)   =>  ActsparseSparseLinear(x, t[, s], W)   (threshold fused)
    Relu-produced x     -> MatMul(x, W)   =>  ActsparseSparseLinear(x, W)          (x != 0 skipped)
    x                   -> MatMul(x, W)   =>  ActsparseDenseLinear(x, Wp)          (W packed once)
    RankSparseMatMul (R-Sparse)       =>  ActsparseRankSparseLinear at one token (rsparse.py)
The sparse forms only where x has at most SPARSE_MAX_ROWS rows (decoding); an encoder's
128 tokens together activate nearly every input channel, so they take the dense kernel.
Quantized linears (quant.py) and gated FFN blocks (ffn_fusion.py) are selected first; the
`linear_converters` turn the dense / sparse nodes into `call_tir`s of kernels/cpu's kernels.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from actsparse.codegen.lowering.ops import (DENSE_LINEAR, LOWERING_DOMAIN, SPARSE_LINEAR, as_converter, attr_text,
                                            declare_lowering_domain, is_lowering_op)
from actsparse.codegen.targets import TargetInfo, describe_target
from actsparse.errors import ActsparseError
from actsparse.ir.blocks import Linear, find_linears
from actsparse.ir.custom_ops import SPARSIFY_WEIGHTED, add_initializer, is_sparsify, unique_node_name
from actsparse.ir.large import drop_pages

# Sparse-input kernels read a weight row when its input channel is active in ANY of the M rows:
# at 50 % sparsity per row, 1 - 0.5**M of the rows (94 % at M = 4). Above this many rows the
# dense kernel is faster (measured: MiniLM seq 128, TEAL 50 %: sparse kernels 150 ms, dense 38 ms).
SPARSE_MAX_ROWS = 4


@dataclass
class KernelPlan:
    """Which kernel each linear layer got, for the compile report."""

    layers: list[dict] = field(default_factory=list)


def select_kernels(model: ir.Model, target: TargetInfo | None = None,
                   fused_ffn_forms: frozenset[str] | None = None) -> KernelPlan:
    """Rewrite linears into kernel nodes in place (see the module docstring). `target`: None
    selects as for no particular CPU (16-lane kernels); `fused_ffn_forms`: the fused FFN kernels
    to use (default: all that the target has, ffn_fusion.FORMS)."""
    from actsparse.codegen.lowering.ffn_fusion import CUDA_FORMS, FORMS, fuse_ffn_blocks
    from actsparse.codegen.lowering.quant import is_int4_dequantize, select_quant_kernels
    from actsparse.codegen.lowering.rsparse import select_rank_sparse_kernels

    target = describe_target(target)  # None: no particular CPU; a TargetInfo stays as it is
    # Quantized linears (QDQ, dynamic, MatMulNBits) first, then gated FFN blocks that fit
    # one fused kernel, then every remaining float linear. A CUDA target takes only the kernels
    # that have a CUDA twin (kernels/cuda): the dense FFN runs as three dense GEMVs there, and
    # quantized linears stay with TVM's own lowering until they have CUDA kernels.
    # R-Sparse linears first: one token on a CPU takes the fused kernel, anything else is expanded
    # into a SparsifyWeighted and three MatMuls, which the loop below gives kernels like any other.
    rank_sparse_layers = select_rank_sparse_kernels(model, target.kind in ("", "llvm"),
                                                    lanes=target.kernel_lanes("sparse"))
    if target.on_cuda:
        if any(node.op_type == "MatMulNBits" or is_int4_dequantize(node) for node in model.graph):
            # (TVM's own importer cannot read int4 tensors either: "TensorCopyFromBytes: size mismatch")
            raise ActsparseError("int4 weights (MatMulNBits or int4 DequantizeLinear) have no CUDA kernel yet: compile "
                                 "for a CPU target, or quantize to int8 (mode=dynamic or mode=static)")
        quant_layers = [{"name": node.name, "kernel": "tvm", "reason": "no CUDA int8/int4 kernel yet"}
                        for node in model.graph if node.op_type in ("MatMulInteger", "MatMulNBits", "DequantizeLinear")]
        fused_ffn_forms = CUDA_FORMS
    else:
        quant_layers = select_quant_kernels(model, lanes=target.kernel_lanes("dense"), int8_dot=target.vnni)
    plan = KernelPlan(fuse_ffn_blocks(model, FORMS if fused_ffn_forms is None else fused_ffn_forms))
    plan.layers += quant_layers + rank_sparse_layers
    for linear in find_linears(model):
        # A linear fed by one rewritten above reads the rewrite's output now.
        if linear.node.inputs and linear.node.inputs[0] is not linear.input and linear.node.inputs[0] is not None:
            linear = dataclasses.replace(linear, input=linear.node.inputs[0])
        if not _lowerable(linear):
            plan.layers.append({"name": linear.name, "kernel": "tvm", "reason": "not a 2-D float32 weight on the right"})
            continue
        x_shape = _static_shape(linear.input)
        if x_shape is None:
            plan.layers.append({"name": linear.name, "kernel": "tvm", "reason": "input shape not static"})
            continue
        weight = _weight_kn(linear)
        x = linear.input
        producer = x.producer()
        rows = int(np.prod(x_shape[:-1]))
        if rows > SPARSE_MAX_ROWS:  # the Sparsify (if any) stays, as plain ONNX, before a dense kernel
            producer = None
        inputs: list[ir.Value | None]
        if producer is not None and is_sparsify(producer):
            mode = "scaled" if producer.op_type == SPARSIFY_WEIGHTED else "threshold"
            w = add_initializer(model, f"{linear.name}.weight_kn", weight)
            inputs = [producer.inputs[0], producer.inputs[1], *producer.inputs[2:3], w]
            op = SPARSE_LINEAR
        elif producer is not None and _zero_producing(producer):
            mode, op = "nonzero", SPARSE_LINEAR
            inputs = [x, add_initializer(model, f"{linear.name}.weight_kn", weight)]
        else:  # packed for the target's vector width in to_relax
            mode, op = "dense", DENSE_LINEAR
            inputs = [x, add_initializer(model, f"{linear.name}.weight_kn", weight)]
        attributes = {"mode": ir.AttrString("mode", mode), "n": ir.AttrInt64("n", weight.shape[1]),
                      "x_shape": ir.AttrInt64s("x_shape", x_shape), "layer": ir.AttrString("layer", linear.name)}
        node = ir.Node(LOWERING_DOMAIN, op, inputs, attributes=attributes,
                       name=unique_node_name(model, f"{linear.name}.kernel"))
        product = linear.node.outputs[0]
        node.outputs[0].type, node.outputs[0].shape = product.type, product.shape
        model.graph.insert_before(linear.node, node)
        result = node.outputs[0]
        if linear.bias is not None:  # the bias (Gemm's C, or MatMul's following Add) stays a plain Add
            add = ir.Node("", "Add", [result, linear.bias], name=unique_node_name(model, f"{linear.name}.bias"))
            add.outputs[0].type, add.outputs[0].shape = linear.output.type, linear.output.shape
            model.graph.insert_before(linear.node, add)
            result = add.outputs[0]
        # linear.output is after the bias: replacing it drops the MatMul's own bias Add with it.
        output_name = linear.output.name if linear.output.is_graph_output() else None
        ir.convenience.replace_all_uses_with(linear.output, result, replace_graph_outputs=True)
        if output_name:  # the model keeps its output names (e.g. GPT-2's logits from lm_head)
            linear.output.name = f"{output_name}.replaced"
            result.name = output_name
        plan.layers.append({"name": linear.name, "kernel": mode, "shape": list(weight.shape)})
    import onnx_ir.passes.common as common

    common.RemoveUnusedNodesPass()(model)
    declare_lowering_domain(model)
    return plan


def _lowerable(linear: Linear) -> bool:
    """A float32 product of the activation (left) and a constant 2-D weight (right, possibly
    reached through Transpose/Cast/Identity, e.g. GPT-2's tied lm_head) that our kernels take."""
    w = linear.weight.const_value
    if w is None or w.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16) or len(w.shape) != 2:
        return False
    return linear.node.outputs[0].dtype == ir.DataType.FLOAT and linear.plain_product


def _static_shape(value: ir.Value) -> list[int] | None:
    """The value's shape when every dim is a known int (after shape specialization), else None."""
    if value.shape is None or not all(isinstance(d, int) for d in value.shape):
        return None
    return [int(d) for d in value.shape]


def _weight_kn(linear: Linear) -> np.ndarray:
    w = linear.weight.const_value.numpy().astype(np.float32, copy=False)  # no copy of float32 (maybe mmapped)
    kn = np.ascontiguousarray(w.T if linear.weight_layout == "NK" else w)
    if kn is not w:
        drop_pages(w)  # copied: external data need not stay resident (large models, ir/large.py)
    return kn


def _zero_producing(node: ir.Node) -> bool:
    """x is exactly zero where a ReLU cut it: Relu(.), or Mul(Relu(.), up) in a gated FFN."""
    if node.op_type == "Relu":
        return True
    if node.op_type == "Mul":
        return any(v is not None and v.producer() is not None and v.producer().op_type == "Relu" for v in node.inputs)
    return False


def pack_dense_weights(model: ir.Model, target: TargetInfo) -> None:
    """W [K, N] of every dense kernel node -> column panels of 2 x the target's vector lanes."""
    from actsparse.codegen.kernels.cpu.dense import pack_dense

    block = 2 * target.kernel_lanes("dense")
    for node in model.graph:
        if not is_lowering_op(node, DENSE_LINEAR) or node.inputs[1].const_value is None:
            continue
        weight = node.inputs[1]
        if len(weight.shape) == 3:
            continue  # already packed
        packed = pack_dense(weight.const_value.numpy(), block=block)
        drop_pages(weight.const_value.numpy())
        node.replace_input_with(1, add_initializer(model, f"{node.name}.weight_packed", packed))
        if not weight.uses():  # free an unpacked copy now: peak memory stays near 1x the weights
            model.graph.initializers.pop(weight.name)
    import onnx_ir.passes.common as common

    common.RemoveUnusedNodesPass()(model)


def linear_converters(target: TargetInfo) -> dict:
    """from_onnx converters for the dense and sparse linear nodes (one PrimFunc per shape and mode)."""
    kernels = _KernelCache(target)
    return {DENSE_LINEAR: _converter(kernels, "dense"), SPARSE_LINEAR: _converter(kernels, "sparse")}


class _KernelCache:
    """One PrimFunc per (kind, mode, m, k, n), added to the module once."""

    def __init__(self, target: TargetInfo):
        self.lanes = {kind: target.kernel_lanes(kind) for kind in ("dense", "sparse")}
        self.schedule = target.row_schedule
        self.functions: dict[tuple, object] = {}

    def get(self, bb, kind: str, mode: str, m: int, k: int, n: int):
        from actsparse.codegen.kernels.cpu.dense import dense_matmul
        from actsparse.codegen.kernels.cpu.sparse import sparse_matmul

        key = (kind, mode, m, k, n)
        if key not in self.functions:
            if kind == "dense":
                func = dense_matmul(m, k, n, lanes=self.lanes["dense"], schedule=self.schedule)
            else:
                func = sparse_matmul(m, k, n, mode=mode, lanes=self.lanes["sparse"], schedule=self.schedule)
            name = f"actsparse_{kind}_{mode}_m{m}_k{k}_n{n}"
            self.functions[key] = bb.add_func(func.with_attr("global_symbol", name), name)
        return self.functions[key]


def _converter(kernels: _KernelCache, kind: str):
    from tvm import relax

    def convert(bb, inputs, attrs, params):
        x = inputs[0]
        n = int(attrs["n"])
        mode = attr_text(attrs.get("mode", "dense"))
        shape = [int(d) for d in attrs["x_shape"]]  # from ONNX: TVM may have lost a static shape
        k = shape[-1]
        m = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
        x2 = bb.emit(relax.op.reshape(x, (m, k))) if len(shape) != 2 else x
        func = kernels.get(bb, kind, mode, m, k, n)
        rest = list(inputs[1:])
        if mode in ("threshold", "scaled"):  # the kernel takes the scalar threshold as f32[1]
            rest[0] = bb.emit(relax.op.reshape(rest[0], (1,)))
        y = bb.emit(relax.call_tir(func, [x2, *rest], relax.TensorType((m, n), "float32")))
        return relax.op.reshape(y, (*shape[:-1], n)) if len(shape) != 2 else y

    return as_converter(convert)
