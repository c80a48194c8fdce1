"""Lower an optimized ONNX model to a TVM Relax module whose linear layers call our kernels.

1. specialize_shapes: fix the input shapes (TVM 0.27's ONNX importer needs static shapes), fold and infer.
2. select_kernels (lowering/select.py, on the ONNX graph): quantized linears, fused FFN blocks,
   R-Sparse linears and every other linear become `actsparse.lowering` kernel nodes.
3. to_relax: pack the dense weights for the target, import with TVM's `from_onnx` extended with
   our converters (lowering/relax_import.py), then schedule the ops TVM lowers itself
   (lowering/tvm_schedule.py).
Every step reads the target's facts from one `TargetInfo` (codegen/targets.py).
"""

from __future__ import annotations

import onnx_ir as ir

from actsparse.codegen.lowering.ops import DENSE_LINEAR, SPARSE_LINEAR
from actsparse.codegen.lowering.relax_import import balance_variadic_ops, import_onnx
from actsparse.codegen.lowering.select import KernelPlan, pack_dense_weights, select_kernels
from actsparse.codegen.lowering.tvm_schedule import schedule_tvm_ops
from actsparse.codegen.targets import TargetInfo, describe_target
from actsparse.errors import ActsparseError

# The driver's surface: the steps, and the kernel nodes' names a caller checks a plan against.
__all__ = ["DENSE_LINEAR", "SPARSE_LINEAR", "KernelPlan", "select_kernels", "specialize_shapes", "to_relax"]


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
        fixed = [(i, d) for i, d in enumerate(value.shape or []) if isinstance(d, int) and d != shape[i]]
        if fixed:  # a static export bakes its sizes into Reshape/Expand constants: it cannot be re-sized
            i, d = fixed[0]
            raise ActsparseError(f"input {value.name!r} has the static shape {tuple(value.shape)}, the example "
                                 f"{shape} (dim {i}: {shape[i]} != {d}); export the model at the shape to "
                                 f"compile, or with that dim dynamic")
        value.shape = ir.Shape(shape)
    return CleanupPass()(model).model


def to_relax(model: ir.Model, target: TargetInfo, companions=None):
    """The kernel-selected model as a Relax IRModule with params detached (main(*inputs, *params)).

    Packs the dense kernels' weights for `target`'s vector width first (in `model`, in place).
    `companions(model)` -> {name: ir.Model}: more entry points over the same weights (a causal
    LM's `prefill`, lowering/prefill.py), built from the packed model and imported beside `main`;
    each is `name(*its inputs, *its params)`, its params a subset of main's, by name.
    """
    target = describe_target(target)  # a TargetInfo stays as it is
    pack_dense_weights(model, target)
    balance_variadic_ops(model)
    mod, params = import_onnx(model, target)
    for name, companion in (companions(model) if companions else {}).items():
        extra, _ = import_onnx(companion, target)
        for var, func in extra.functions.items():
            if var.name_hint == "main":
                mod[name] = func.with_attr("global_symbol", name)
            elif any(existing.name_hint == var.name_hint for existing in mod.get_global_vars()):
                raise ActsparseError(f"internal: {name} and main both define {var.name_hint}")
            else:
                mod[var] = func
    mod = schedule_tvm_ops(mod, target)
    return mod, params
