"""Refuse, before lowering, the ops the compiler would otherwise misread.

TVM's ONNX importer dispatches on the op type alone: a `MatMul` of domain `evil.example`
compiled and ran as a plain MatMul, and an `actsparse.Sparsify` with three inputs or a made-up
attribute compiled as if it were well formed. `optimize` refuses such models through
onnx.checker and onnxruntime; `compile` (which may run no pass at all) checks here.
"""

from __future__ import annotations

import onnx_ir as ir

from actsparse.errors import ActsparseError
from actsparse.ir.custom_ops import DOMAIN, SIGNATURES, is_matmul_nbits


def check_lowerable_ops(model: ir.Model) -> None:
    """One ActsparseError naming the first node the compiler cannot lower faithfully."""
    local_functions = {(domain, name) for domain, name, _ in model.functions}
    for node in model.graph:
        domain = node.domain or ""
        where = f"node {node.name!r} ({domain + '.' if domain else ''}{node.op_type})"
        if domain in ("", "ai.onnx") or (domain, node.op_type) in local_functions and domain != DOMAIN:
            continue
        if domain == DOMAIN:
            _check_actsparse_node(node, where)
            continue
        if is_matmul_nbits(node):  # lowered by codegen/lowering/quant.py, 4-bit only
            bits = node.attributes.get_int("bits", 4)
            if bits != 4:
                raise ActsparseError(f"{where}: {bits}-bit MatMulNBits has no compiled kernel (4-bit has); for int8 "
                                     "quantize with mode=dynamic or mode=static, which the int8 kernels take")
            continue
        raise ActsparseError(f"{where}: the compiler does not support ops of domain {domain!r}")


def check_actsparse_ops(model: ir.Model) -> None:
    """One ActsparseError naming the first malformed actsparse-domain node (wrong arity, made-up
    attributes, unknown op): `optimize` says so before onnxruntime fails on it less clearly."""
    for node in model.graph:
        if node.domain == DOMAIN:
            _check_actsparse_node(node, f"node {node.name!r} ({DOMAIN}.{node.op_type})")


def _check_actsparse_node(node: ir.Node, where: str) -> None:
    signature = SIGNATURES.get(node.op_type)
    if signature is None:
        raise ActsparseError(f"{where}: unknown actsparse op (known: {', '.join(SIGNATURES)})")
    inputs, outputs = signature
    if len(node.inputs) != inputs or len(node.outputs) != outputs or any(v is None for v in node.inputs):
        raise ActsparseError(f"{where}: takes {inputs} inputs and {outputs} outputs, has "
                             f"{len(node.inputs)} and {len(node.outputs)}")
    if node.attributes:
        raise ActsparseError(f"{where}: takes no attributes, has {', '.join(node.attributes)}")
