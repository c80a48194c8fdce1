"""The ops of domain `actsparse.lowering`: kernel nodes that exist only between kernel selection
and the Relax import (never in a saved model), and the helpers every converter shares.

Each node names the kernel a layer got and carries its packed weights; its converter (in the
module that made it) turns it into a `call_tir` of that kernel.
"""

from __future__ import annotations

from typing import Any, Callable

import onnx_ir as ir

LOWERING_DOMAIN = "actsparse.lowering"

DENSE_LINEAR = "ActsparseDenseLinear"  # select.py
SPARSE_LINEAR = "ActsparseSparseLinear"  # select.py
FUSED_FFN = "ActsparseFusedFFN"  # ffn_fusion.py
QUANT_LINEAR = "ActsparseQuantLinear"  # quant.py
RANK_SPARSE_LINEAR = "ActsparseRankSparseLinear"  # rsparse.py
DECODE_ATTENTION = "ActsparseDecodeAttention"  # codegen/kv_cache.py
PREFILL_LINEAR = "PrefillLinear"  # frontend/decode_graph.py's placeholders, bound in prefill.py
PREFILL_ATTENTION = "PrefillAttention"  # frontend/decode_graph.py


def is_lowering_op(node: ir.Node, *op_types: str) -> bool:
    """Whether `node` is one of these `actsparse.lowering` ops (any of them when none is named)."""
    return node.domain == LOWERING_DOMAIN and (not op_types or node.op_type in op_types)


def declare_lowering_domain(model: ir.Model) -> None:
    """The opset import a model with kernel nodes needs (TVM's importer reads it)."""
    model.opset_imports.setdefault(LOWERING_DOMAIN, 1)


def as_converter(convert: Callable[..., Any]) -> type:
    """A class `tvm.relax.frontend.onnx.from_onnx` accepts in its convert map, calling
    `convert(bb, inputs, attrs, params)` for every opset."""
    return type("Converter", (), {"get_converter": classmethod(lambda cls, opset: convert)})


def attr_text(value: Any) -> str:
    """A string attribute as the importer hands it over (bytes or str)."""
    return value.decode() if isinstance(value, bytes) else str(value)
