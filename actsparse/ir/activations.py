"""Recognize activation functions in an ONNX graph, whatever form the exporter gave them.

An activation may be one op (`Gelu`, `Relu`, `LeakyRelu`, `Tanh`, `Sigmoid`) or a small
decomposition (`x * 0.5 * (1 + Erf(x / sqrt 2))`, `x * Sigmoid(x)`, the tanh form of GELU,
`Relu(x) ** 2`, ...) whose operands come in any order. Instead of listing every ordering,
`match_activation` collects the elementwise subgraph that ends in a value, finds the single
input it depends on, evaluates it on sample points with numpy and compares the result with
each known function. A subgraph is reported only if it is self-contained (no intermediate
value is used outside it), so a rewrite pass may replace `Activation.nodes` as a whole.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

__all__ = ["Activation", "ACTIVATION_KINDS", "match_activation"]

# Unary elementwise ops and binary ones whose second operand is a scalar constant.
_ELEMENTWISE_OPS = frozenset({
    "Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Reciprocal", "Neg", "Abs", "Exp", "Log",
    "Erf", "Tanh", "Sigmoid", "Relu", "LeakyRelu", "Gelu", "Softplus", "HardSigmoid",
    "Max", "Min", "Clip", "Identity", "Swish",
})
_MAX_SUBGRAPH_NODES = 16

_SAMPLES = np.concatenate([np.linspace(-6.0, 6.0, 121), [-1e-3, 1e-3, -0.37, 0.37, 2.9, -2.9]])
_erf = np.vectorize(math.erf, otypes=[np.float64])


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def _gelu(x):
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))


def _gelu_tanh(x):
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


# Reference functions, checked in this order (relu before leaky_relu, whose fit covers it).
_REFERENCES = {
    "gelu": _gelu,
    "gelu_tanh": _gelu_tanh,
    "silu": lambda x: x * _sigmoid(x),
    "quick_gelu": lambda x: x * _sigmoid(1.702 * x),
    "relu": lambda x: np.maximum(x, 0.0),
    "relu2": lambda x: np.maximum(x, 0.0) ** 2,
    "tanh": np.tanh,
    "sigmoid": _sigmoid,
}
ACTIVATION_KINDS = (*_REFERENCES, "leaky_relu", "shifted_relu")


@dataclass(eq=False)
class Activation:
    """An activation subgraph `output = f(input)`.

    kind: one of ACTIVATION_KINDS ("gelu", "gelu_tanh", "silu", "quick_gelu", "relu",
    "relu2" (squared ReLU), "leaky_relu", "tanh", "sigmoid").
    nodes: every node of the subgraph in topological order (scalar Constant nodes used
    only by it included); none of their outputs but `output` is used outside.
    params: extra parameters, e.g. {"alpha": 0.01} for leaky_relu.
    """

    kind: str
    input: ir.Value
    output: ir.Value
    nodes: list[ir.Node]
    params: dict[str, float] = field(default_factory=dict)


def match_activation(value_or_node: ir.Value | ir.Node) -> Activation | None:
    """Return the activation whose output is `value_or_node` (or the node's first output), or None.

    When several inputs are possible (e.g. `Relu(x) ** 2` is also a square of `Relu(x)`),
    the smallest subgraph that is a known activation wins.
    """
    output = value_or_node.outputs[0] if isinstance(value_or_node, ir.Node) else value_or_node
    closure = _elementwise_closure(output)
    if not closure:
        return None
    for candidate, nodes in _inputs_by_subgraph_size(output, closure):
        if not _self_contained(nodes, output):
            continue
        ordered = _topological(nodes)
        try:
            with np.errstate(all="ignore"):
                values = _evaluate(ordered, candidate, output)
        except _NotEvaluable:
            continue
        kind, params = _classify(values)
        if kind is not None:
            activation = Activation(kind, candidate, output, _with_constants(ordered, nodes), params)
            return _with_shift(activation) if kind == "relu" else activation
    return None


def _with_shift(relu: Activation) -> Activation:
    """Relu(x - b) (or Relu(x + c)) with a scalar constant is a shifted ReLU of x: the
    smallest-subgraph rule alone would stop at Relu and hide the linear layer feeding x."""
    producer = relu.input.producer()
    if producer is None or producer.op_type not in ("Sub", "Add") or len(producer.inputs) != 2:
        return relu
    x, constant = producer.inputs
    offset = _scalar_constant(constant)
    if offset is None or x is None or len(relu.input.uses()) != 1:
        return relu
    shift = offset if producer.op_type == "Sub" else -offset
    nodes = [*([constant.producer()] if constant.producer() is not None else []), producer, *relu.nodes]
    return Activation("shifted_relu", x, relu.output, nodes, {"shift": shift})


class _NotEvaluable(Exception):
    pass


def _constant_tensor(value: ir.Value):
    """The tensor of an initializer or Constant-node output (not an overridable input), else None."""
    if value.is_graph_input():
        return None
    try:
        return ir.convenience.get_const_tensor(value)
    except ValueError:
        return None


def _scalar_constant(value: ir.Value | None) -> float | None:
    """The value of a one-element numeric constant, else None."""
    tensor = None if value is None else _constant_tensor(value)
    if tensor is None or math.prod(tensor.shape.dims) != 1:
        return None
    array = tensor.numpy()
    if not np.issubdtype(array.dtype, np.number):
        return None
    return float(array.reshape(()))


def _includable(node: ir.Node | None) -> bool:
    """An elementwise node whose constant operands are all scalars."""
    if node is None or node.domain not in ("", "ai.onnx") or node.op_type not in _ELEMENTWISE_OPS:
        return False
    if len(node.outputs) != 1:
        return False
    for value in node.inputs:
        if value is not None and _constant_tensor(value) is not None and _scalar_constant(value) is None:
            return False
    return True


def _variable_inputs(node: ir.Node) -> list[ir.Value]:
    return [v for v in node.inputs if v is not None and _scalar_constant(v) is None]


def _elementwise_closure(output: ir.Value) -> set[ir.Node]:
    """All includable nodes reachable backwards from `output` through includable nodes."""
    closure: set[ir.Node] = set()
    stack = [output]
    while stack:
        node = stack.pop().producer()
        if node in closure or not _includable(node):
            continue
        closure.add(node)
        if len(closure) > _MAX_SUBGRAPH_NODES:
            return set()
        stack.extend(_variable_inputs(node))
    return closure


def _nodes_above(output: ir.Value, cut: ir.Value, closure: set[ir.Node]) -> tuple[set[ir.Node], set[ir.Value]]:
    """Nodes between `cut` and `output`, and the variable leaves reached (cut included)."""
    nodes: set[ir.Node] = set()
    leaves: set[ir.Value] = set()
    stack = [output]
    while stack:
        value = stack.pop()
        node = value.producer()
        if value is cut or node not in closure:
            leaves.add(value)
            continue
        if node not in nodes:
            nodes.add(node)
            stack.extend(_variable_inputs(node))
    return nodes, leaves


def _inputs_by_subgraph_size(output: ir.Value, closure: set[ir.Node]):
    """(input, nodes) pairs where every path from `output` back leads to `input`, smallest first."""
    candidates = {v for node in closure for v in _variable_inputs(node)}
    found = []
    for candidate in candidates:
        nodes, leaves = _nodes_above(output, candidate, closure)
        if leaves == {candidate} and nodes:
            found.append((len(nodes), candidate.name or "", candidate, nodes))
    found.sort(key=lambda item: (item[0], item[1]))
    return [(candidate, nodes) for _, _, candidate, nodes in found]


def _self_contained(nodes: set[ir.Node], output: ir.Value) -> bool:
    for node in nodes:
        for value in node.outputs:
            if value is output:
                continue
            if value.is_graph_output() or any(use.node not in nodes for use in value.uses()):
                return False
    return True


def _topological(nodes: set[ir.Node]) -> list[ir.Node]:
    ordered: list[ir.Node] = []
    done: set[ir.Node] = set()

    def visit(node: ir.Node) -> None:
        if node in done:
            return
        done.add(node)
        for value in node.inputs:
            if value is not None and value.producer() in nodes:
                visit(value.producer())
        ordered.append(node)

    for node in sorted(nodes, key=lambda n: n.name or ""):
        visit(node)
    return ordered


def _with_constants(ordered: list[ir.Node], nodes: set[ir.Node]) -> list[ir.Node]:
    """Prepend the Constant nodes whose outputs only this subgraph uses."""
    constants = []
    for node in ordered:
        for value in node.inputs:
            producer = value.producer() if value is not None else None
            if (producer is not None and producer.op_type == "Constant" and producer not in constants
                    and all(use.node in nodes for use in value.uses()) and not value.is_graph_output()):
                constants.append(producer)
    return constants + ordered


def _evaluate(ordered: list[ir.Node], input_value: ir.Value, output: ir.Value) -> np.ndarray:
    env: dict[ir.Value, np.ndarray] = {input_value: _SAMPLES}

    def operand(value: ir.Value | None, default: float | None = None):
        if value is None:
            if default is None:
                raise _NotEvaluable
            return default
        if value in env:
            return env[value]
        constant = _scalar_constant(value)
        if constant is None:
            raise _NotEvaluable
        return constant

    for node in ordered:
        args = [operand(v) for v in node.inputs[:2] if v is not None] if node.op_type != "Clip" else []
        env[node.outputs[0]] = _apply(node, args, operand)
    return np.asarray(env[output], dtype=np.float64)


def _apply(node: ir.Node, args: list, operand) -> np.ndarray:
    op = node.op_type
    binary = {
        "Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide,
        "Pow": np.power, "Max": np.maximum, "Min": np.minimum,
    }
    unary = {
        "Sqrt": np.sqrt, "Reciprocal": np.reciprocal, "Neg": np.negative, "Abs": np.abs,
        "Exp": np.exp, "Log": np.log, "Erf": _erf, "Tanh": np.tanh, "Sigmoid": _sigmoid,
        "Relu": lambda x: np.maximum(x, 0.0), "Softplus": lambda x: np.log1p(np.exp(x)),
        "Identity": lambda x: x,
    }
    if op in binary:
        if len(args) != 2 or len(node.inputs) != 2:
            raise _NotEvaluable
        return binary[op](np.asarray(args[0], np.float64), np.asarray(args[1], np.float64))
    if op == "Clip":
        x = operand(node.inputs[0])
        low = operand(node.inputs[1] if len(node.inputs) > 1 else None, -np.inf)
        high = operand(node.inputs[2] if len(node.inputs) > 2 else None, np.inf)
        return np.clip(x, low, high)
    if len(args) != 1:
        raise _NotEvaluable
    x = np.asarray(args[0], np.float64)
    if op in unary:
        return unary[op](x)
    if op == "LeakyRelu":
        alpha = _attribute(node, "alpha", 0.01)
        return np.where(x >= 0, x, alpha * x)
    if op == "HardSigmoid":
        return np.clip(_attribute(node, "alpha", 0.2) * x + _attribute(node, "beta", 0.5), 0.0, 1.0)
    if op == "Swish":
        return x * _sigmoid(_attribute(node, "alpha", 1.0) * x)
    if op == "Gelu":
        approximate = _attribute(node, "approximate", "none")
        return _gelu_tanh(x) if approximate == "tanh" else _gelu(x)
    raise _NotEvaluable


def _attribute(node: ir.Node, name: str, default):
    attr = node.attributes.get(name)
    return default if attr is None else attr.value


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    # Tight enough to tell GELU's erf form from its tanh form (they differ by up to 4.7e-4).
    return bool(np.all(np.isfinite(a))) and np.allclose(a, b, rtol=1e-4, atol=5e-5)


def _classify(values: np.ndarray) -> tuple[str | None, dict[str, float]]:
    for kind, reference in _REFERENCES.items():
        if _close(values, reference(_SAMPLES)):
            return kind, {}
    kept = values > 0
    if kept.sum() > 2:  # shifted ReLU (ProSparse): max(x - b, 0) with a scalar b != 0
        shift = float(np.median(_SAMPLES[kept] - values[kept]))
        if abs(shift) > 1e-6 and _close(values, np.maximum(_SAMPLES - shift, 0.0)):
            return "shifted_relu", {"shift": float(np.float32(shift))}
    positive, negative = _SAMPLES > 0, _SAMPLES < -0.1
    if _close(values[positive], _SAMPLES[positive]):
        alpha = float(np.median(values[negative] / _SAMPLES[negative]))
        # alpha near 1 is a near-identity (RMSNorm's x + eps), not an activation.
        if 0.0 < alpha <= 0.5 and _close(values, np.where(_SAMPLES >= 0, _SAMPLES, alpha * _SAMPLES)):
            return "leaky_relu", {"alpha": float(np.float32(alpha))}
    return None, {}
