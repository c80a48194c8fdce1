"""Lower an optimized ONNX model to a TVM Relax module whose linear layers call our kernels.

1. specialize: fix the input shapes (TVM needs static shapes, shared/NOTES.md), fold and infer.
2. select kernels (on the ONNX graph): every MatMul/Gemm with a constant 2-D weight becomes
     Sparsify(x, t[, s]) -> MatMul(., W)   =>  ActsparseSparseLinear(x, t[, s], W)   (threshold fused)
     Relu-produced x     -> MatMul(x, W)   =>  ActsparseSparseLinear(x, W)          (x != 0 skipped)
     x                   -> MatMul(x, W)   =>  ActsparseDenseLinear(x, Wp)          (W packed once)
   Remaining actsparse functions are inlined to plain ONNX.
3. import with TVM's `from_onnx`, extended with converters that emit `call_tir` into our TIR
   kernels (`codegen/kernels/cpu`); everything else is lowered by TVM.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx.inliner
import onnx_ir as ir

from actsparse.errors import ActsparseError
from actsparse.ir.blocks import Linear, find_linears
from actsparse.ir.custom_ops import DOMAIN, SPARSIFY, SPARSIFY_WEIGHTED, add_initializer, unique_node_name

DENSE_LINEAR = "ActsparseDenseLinear"
SPARSE_LINEAR = "ActsparseSparseLinear"
LOWERING_DOMAIN = "actsparse.lowering"


@dataclass
class KernelPlan:
    """Which kernel each linear layer got, for the compile report."""

    layers: list[dict] = field(default_factory=list)

    def count(self, kind: str) -> int:
        return sum(1 for layer in self.layers if layer["kernel"] == kind)


def specialize_shapes(model: ir.Model, input_shapes: dict[str, tuple[int, ...]]) -> ir.Model:
    """Give every graph input a static shape and re-run folding + shape inference."""
    from actsparse.calibrate.data import model_inputs
    from actsparse.passes.cleanup import CleanupPass

    for value in model_inputs(model):
        if value.name not in input_shapes:
            if value.shape is None or not all(isinstance(d, int) for d in value.shape):
                raise ActsparseError(f"input {value.name!r} has a dynamic shape {value.shape}; give example inputs "
                                     f"to fix it (compiled models have static shapes)")
            continue
        shape = tuple(int(d) for d in input_shapes[value.name])
        if value.shape is not None and len(value.shape) != len(shape):
            raise ActsparseError(f"input {value.name!r}: example has rank {len(shape)}, model expects {len(value.shape)}")
        value.shape = ir.Shape(shape)
    return CleanupPass()(model).model


def select_kernels(model: ir.Model) -> KernelPlan:
    """Rewrite linears into kernel nodes in place (see the module docstring)."""
    from actsparse.codegen.ffn_fusion import fuse_ffn_blocks
    from actsparse.codegen.kernels.cpu.dense import pack_dense

    plan = KernelPlan(fuse_ffn_blocks(model))  # gated FFN blocks that fit one fused kernel, first
    for linear in find_linears(model):
        if not _lowerable(linear):
            plan.layers.append({"name": linear.name, "kernel": "tvm", "reason": "not a 2-D float32 weight on the right"})
            continue
        weight = _weight_kn(linear)
        x = linear.input
        producer = x.producer()
        inputs: list[ir.Value | None]
        if producer is not None and producer.domain == DOMAIN and producer.op_type in (SPARSIFY, SPARSIFY_WEIGHTED):
            mode = "scaled" if producer.op_type == SPARSIFY_WEIGHTED else "threshold"
            w = add_initializer(model, f"{linear.name}.weight_kn", weight)
            inputs = [producer.inputs[0], producer.inputs[1], *producer.inputs[2:3], w]
            op = SPARSE_LINEAR
        elif producer is not None and _zero_producing(producer):
            mode, op = "nonzero", SPARSE_LINEAR
            inputs = [x, add_initializer(model, f"{linear.name}.weight_kn", weight)]
        else:
            mode, op = "dense", DENSE_LINEAR
            inputs = [x, add_initializer(model, f"{linear.name}.weight_packed", pack_dense(weight))]
        node = ir.Node(LOWERING_DOMAIN, op, inputs, attributes={"mode": ir.AttrString("mode", mode),
                                                                "n": ir.AttrInt64("n", weight.shape[1])},
                       name=unique_node_name(model, f"{linear.name}.kernel"))
        out = linear.node.outputs[0]
        node.outputs[0].type, node.outputs[0].shape = out.type, out.shape
        model.graph.insert_before(linear.node, node)
        result = node.outputs[0]
        if linear.bias is not None:  # Gemm's bias stays a plain Add
            add = ir.Node("", "Add", [result, linear.bias], name=unique_node_name(model, f"{linear.name}.bias"))
            add.outputs[0].type, add.outputs[0].shape = out.type, out.shape
            model.graph.insert_before(linear.node, add)
            result = add.outputs[0]
        ir.convenience.replace_all_uses_with(out, result, replace_graph_outputs=True)
        plan.layers.append({"name": linear.name, "kernel": mode, "shape": list(weight.shape)})
    import onnx_ir.passes.common as common

    common.RemoveUnusedNodesPass()(model)
    model.opset_imports.setdefault(LOWERING_DOMAIN, 1)
    return plan


def _lowerable(linear: Linear) -> bool:
    w = linear.weight.const_value
    if w is None or w.dtype != ir.DataType.FLOAT or len(w.shape) != 2:
        return False
    if linear.node.op_type == "Gemm":
        attrs = linear.node.attributes
        if attrs.get_int("transA", 0) or attrs.get_float("alpha", 1.0) != 1.0 or attrs.get_float("beta", 1.0) != 1.0:
            return False
        return linear.node.inputs[0] is linear.input
    return linear.node.op_type == "MatMul" and linear.node.inputs[0] is linear.input and linear.node.inputs[1] is linear.weight


def _weight_kn(linear: Linear) -> np.ndarray:
    w = linear.weight.const_value.numpy().astype(np.float32)
    return np.ascontiguousarray(w.T if linear.weight_layout == "NK" else w)


def _zero_producing(node: ir.Node) -> bool:
    """x is exactly zero where a ReLU cut it: Relu(.), or Mul(Relu(.), up) in a gated FFN."""
    if node.op_type == "Relu":
        return True
    if node.op_type == "Mul":
        return any(v is not None and v.producer() is not None and v.producer().op_type == "Relu" for v in node.inputs)
    return False


def to_relax(model: ir.Model, target):
    """The kernel-selected model as a Relax IRModule with params detached (main(*inputs, *params))."""
    from tvm import relax
    from tvm.relax.frontend import detach_params
    from tvm.relax.frontend.onnx import from_onnx

    proto = ir.serde.serialize_model(model)
    proto = onnx.inliner.inline_local_functions(proto)
    with _our_converters(target):
        try:
            mod = from_onnx(proto, keep_params_in_input=True, sanitize_input_names=False)
        except Exception as exc:
            first = str(exc).strip().splitlines()
            raise ActsparseError(f"TVM cannot import the model: {first[-1] if first else type(exc).__name__}") from None
    mod, params = detach_params(mod)
    return mod, {name: [p.numpy() for p in values] for name, values in params.items()}


@contextlib.contextmanager
def _our_converters(target):
    from tvm.relax.frontend.onnx import onnx_frontend

    from actsparse.codegen.ffn_fusion import fused_ffn_converters

    original = onnx_frontend._get_convert_map
    kernels = _KernelCache(target)
    fused = fused_ffn_converters(target)

    def extended():
        table = dict(original()) | fused
        table[DENSE_LINEAR] = _converter(kernels, "dense")
        table[SPARSE_LINEAR] = _converter(kernels, "sparse")
        return table

    onnx_frontend._get_convert_map = extended
    try:
        yield
    finally:
        onnx_frontend._get_convert_map = original


class _KernelCache:
    """One PrimFunc per (kind, mode, m, k, n), added to the module once."""

    def __init__(self, target):
        from actsparse.codegen.kernels.cpu.dense import vector_lanes

        self.lanes = vector_lanes(target)
        self.functions: dict[tuple, object] = {}

    def get(self, bb, kind: str, mode: str, m: int, k: int, n: int):
        from actsparse.codegen.kernels.cpu.dense import dense_matmul
        from actsparse.codegen.kernels.cpu.sparse import sparse_matmul

        key = (kind, mode, m, k, n)
        if key not in self.functions:
            if kind == "dense":
                func = dense_matmul(m, k, n, lanes=self.lanes)
            else:
                func = sparse_matmul(m, k, n, mode=mode, lanes=self.lanes)
            name = f"actsparse_{kind}_{mode}_m{m}_k{k}_n{n}"
            self.functions[key] = bb.add_func(func.with_attr("global_symbol", name), name)
        return self.functions[key]


def _converter(kernels: _KernelCache, kind: str):
    from tvm import relax

    class Converter:
        @classmethod
        def get_converter(cls, opset):
            return cls.convert

        @staticmethod
        def convert(bb, inputs, attrs, params):
            x = inputs[0]
            n = int(attrs["n"])
            mode = attrs.get("mode", "dense")
            mode = mode.decode() if isinstance(mode, bytes) else mode
            shape = [int(d) for d in x.ty.shape]
            k = shape[-1]
            m = int(np.prod(shape[:-1])) if len(shape) > 1 else 1
            x2 = bb.emit(relax.op.reshape(x, (m, k))) if len(shape) != 2 else x
            func = kernels.get(bb, kind, mode, m, k, n)
            rest = list(inputs[1:])
            if mode in ("threshold", "scaled"):  # the kernel takes the scalar threshold as f32[1]
                rest[0] = bb.emit(relax.op.reshape(rest[0], (1,)))
            y = bb.emit(relax.call_tir(func, [x2, *rest], relax.TensorType((m, n), "float32")))
            return relax.op.reshape(y, (*shape[:-1], n)) if len(shape) != 2 else y

    return Converter
