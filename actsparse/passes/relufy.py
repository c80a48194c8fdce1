"""relufy: smooth activations (GELU, SiLU/Swish) -> the ReLU family.

Before: h = Gelu(x)  or  h = x * 0.5 * (1 + Erf(x / sqrt(2)))  or  h = x * Sigmoid(x)
After:  h = Relu(x)                 (act=relu)
        h = Relu(x) * Relu(x)       (act=relu2, squared ReLU)
        h = Relu(x - shift)         (act=shifted_relu, ProSparse-style shifted ReLU)

ReLU outputs are exactly zero for non-positive inputs, so the next linear layer can skip
those rows. Approximate: without fine-tuning (see actsparse.train) the model's outputs move;
the pipeline reports the cost. scope=ffn rewrites the activations of discovered FFN blocks,
scope=all every GELU/SiLU in the main graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx_ir as ir

from actsparse.errors import ActsparseError
from actsparse.ir.activations import match_activation
from actsparse.ir.blocks import find_blocks
from actsparse.ir.custom_ops import add_initializer, unique_name, unique_node_name
from actsparse.passes.base import ActsparsePass, option, register

SMOOTH_KINDS = ("gelu", "gelu_tanh", "silu")


@dataclass
class RelufyOptions:
    """Options of `relufy` (approximate).

    Attributes:
        act: the replacement activation: "relu" (default), "relu2" (ReLU squared) or
            "shifted_relu" (Relu(x - shift)).
        shift: act=shifted_relu only: the threshold b (default 0.0).
        scope: "ffn" (default): FFN-block activations only; "all": every GELU/SiLU.
    """
    act: Literal["relu", "relu2", "shifted_relu"] = option("relu", "replacement activation")
    shift: float = option(0.0, "threshold b of shifted_relu: Relu(x - b)")
    scope: Literal["ffn", "all"] = option("ffn", "FFN-block activations only, or every GELU/SiLU")

    def validate(self) -> None:
        if self.shift != 0.0 and self.act != "shifted_relu":
            raise ActsparseError("pass 'relufy' option 'shift' applies only to act=shifted_relu")


@register
class RelufyPass(ActsparsePass):
    """Replace GELU/SiLU activations with ReLU, squared ReLU or shifted ReLU (approximate)."""

    name = "relufy"
    exact = False
    Options = RelufyOptions

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        activations = self._targets(model)
        replaced: dict[str, int] = {}
        for act in activations:
            new_output = self._replacement(model, act)
            if act.output.is_graph_output():  # the graph's output keeps its name
                name = act.output.name
                act.output.name = unique_name(model, f"{name}_before_relufy")
                new_output.name = name
            ir.convenience.replace_all_uses_with(act.output, new_output, replace_graph_outputs=True)
            constants = {v.name: v for node in act.nodes for v in node.inputs if v is not None and v.is_initializer()}
            model.graph.remove(act.nodes, safe=True)
            for name, value in constants.items():  # GELU's sqrt(2), 0.5, 1 when nothing else reads them
                if not value.uses() and not value.is_graph_output():
                    del model.graph.initializers[name]
            replaced[act.kind] = replaced.get(act.kind, 0) + 1
        self.report = {"replaced": sum(replaced.values()), "by_kind": replaced, "act": self.options.act}
        return ir.passes.PassResult(model, modified=bool(replaced))

    def _targets(self, model: ir.Model):
        if self.options.scope == "ffn":
            candidates = [block.activation for block in find_blocks(model).ffn]
        else:
            candidates = [match_activation(node) for node in model.graph]
        unique = {id(a.output): a for a in candidates if a is not None and a.kind in SMOOTH_KINDS}
        return list(unique.values())

    def _replacement(self, model: ir.Model, act) -> ir.Value:
        x = act.input
        anchor = act.output.producer()
        base = act.output.name or "act"
        nodes = []
        if self.options.act == "shifted_relu":
            dtype = x.dtype.numpy() if x.dtype is not None else np.float32
            shift = add_initializer(model, f"{base}_shift", np.array(self.options.shift, dtype=dtype))
            nodes.append(ir.Node("", "Sub", [x, shift], name=unique_node_name(model, f"{base}_shift_sub")))
            x = nodes[-1].outputs[0]
        nodes.append(ir.Node("", "Relu", [x], name=unique_node_name(model, f"{base}_relu")))
        if self.options.act == "relu2":
            relu = nodes[-1].outputs[0]
            nodes.append(ir.Node("", "Mul", [relu, relu], name=unique_node_name(model, f"{base}_relu_squared")))
        for node in nodes:
            out = node.outputs[0]
            out.type, out.shape = act.output.type, act.output.shape
        model.graph.insert_before(anchor, nodes)
        return nodes[-1].outputs[0]
