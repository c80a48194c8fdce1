"""cleanup: constant folding, dead-code and identity removal, shape inference.

Before: a graph with foldable constant subgraphs (Shape->Gather->Concat on static shapes,
        Constant->Cast, ...), Identity nodes, unused nodes, initializers and functions.
After:  the same function with those folded or removed, and value shapes/types inferred.

Exact: the model's outputs are unchanged (checked to 1e-5). Control flow (If/Loop bodies),
dynamic shapes and external-data tensors are kept; actsparse custom ops are not inlined.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import onnx_ir as ir
import onnx_ir.passes.common as common
import onnxscript.optimizer

from actsparse.passes.base import ActsparsePass, option, register

# onnx_ir's ShapeInferencePass serializes the model without its initializers above 1 KB (they
# become typed graph inputs for the call), so weights of any size never reach the protobuf.
# Tensors inside nodes (Constant values) still do: skip inference when those pass this.
_INLINE_TENSOR_LIMIT = 1 << 30


@dataclass
class CleanupOptions:
    """Options of `cleanup` (exact).

    Attributes:
        fold_constants: fold subgraphs whose inputs are all constant (default True).
        shape_inference: infer value shapes and types (default True).
    """
    fold_constants: bool = option(True, "fold subgraphs whose inputs are all constant")
    shape_inference: bool = option(True, "infer value shapes and types")


@register
class CleanupPass(ActsparsePass):
    """Fold constants, remove dead code and Identity nodes, infer shapes (exact)."""

    name = "cleanup"
    exact = True
    Options = CleanupOptions

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        nodes_before = _count_nodes(model.graph)
        inits_before = len(model.graph.initializers)
        if self.options.fold_constants:
            # inline=False keeps actsparse.* ops (and any other model-local functions) intact.
            # The folder logs a warning for every value it tries and cannot fold: not our user's concern.
            folding_log = logging.getLogger("onnxscript.optimizer._constant_folding")
            level = folding_log.level
            folding_log.setLevel(logging.ERROR)
            try:
                onnxscript.optimizer.optimize_ir(model, inline=False, onnx_shape_inference=False)
            finally:
                folding_log.setLevel(level)
        passes = [
            common.IdentityEliminationPass(),
            common.RemoveUnusedNodesPass(),
            common.RemoveUnusedFunctionsPass(),
            common.RemoveUnusedOpsetsPass(),
        ]
        for pass_ in passes:
            model = pass_(model).model
        inferred = False
        if self.options.shape_inference and _inline_tensor_bytes(model) < _INLINE_TENSOR_LIMIT:
            model = common.ShapeInferencePass(strict_mode=False)(model).model
            inferred = True
        nodes_after = _count_nodes(model.graph)
        self.report = {
            "nodes_before": nodes_before,
            "nodes_after": nodes_after,
            "initializers_removed": inits_before - len(model.graph.initializers),
            "shape_inference": inferred,
        }
        return ir.passes.PassResult(model, modified=nodes_after != nodes_before or inferred)


def _count_nodes(graph: ir.Graph) -> int:
    return sum(1 for _ in ir.traversal.RecursiveGraphIterator(graph))


def _inline_tensor_bytes(model: ir.Model) -> int:
    """Bytes of the tensors held by node attributes (Constant values), which shape inference serializes."""
    total = 0
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        for attr in node.attributes.values():
            if attr.type == ir.AttributeType.TENSOR and attr.value is not None:
                total += attr.value.nbytes
    return total
