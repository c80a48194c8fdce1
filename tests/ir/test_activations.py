"""match_activation on every form of GELU / SiLU / ReLU-family the exporters produce."""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from actsparse.ir.activations import match_activation


def _graph(nodes, constants=None, *, opset=18, extra_outputs=()):
    """A model x[4] -> nodes -> y; `constants` maps names to scalar initializers."""
    inits = [numpy_helper.from_array(np.array(v, np.float32), n) for n, v in (constants or {}).items()]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y", *extra_outputs)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              outputs, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    return ir.serde.deserialize_model(model)


def _output(model, name="y"):
    return next(v for v in model.graph.outputs if v.name == name)


N = helper.make_node
SQRT2 = math.sqrt(2.0)
GELU_TANH_C = math.sqrt(2.0 / math.pi)


def _erf_gelu_orderings():
    consts = {"sqrt2": SQRT2, "inv_sqrt2": 1 / SQRT2, "one": 1.0, "half": 0.5}
    erf_div = [N("Div", ["x", "sqrt2"], ["d"]), N("Erf", ["d"], ["e"]), N("Add", ["e", "one"], ["p"])]
    erf_mul = [N("Mul", ["inv_sqrt2", "x"], ["d"]), N("Erf", ["d"], ["e"]), N("Add", ["one", "e"], ["p"])]
    return {
        # TorchScript / BERT: (x * (1 + erf(x / sqrt2))) * 0.5
        "x_times_p_then_half": (erf_div + [N("Mul", ["x", "p"], ["m"]), N("Mul", ["m", "half"], ["y"])], consts),
        # dynamo opset 18: x * (0.5 * (1 + erf(x / sqrt2)))
        "half_p_then_x": (erf_div + [N("Mul", ["half", "p"], ["m"]), N("Mul", ["x", "m"], ["y"])], consts),
        # (x * 0.5) * (1 + erf(x * (1/sqrt2)))
        "half_x_times_p": (erf_mul + [N("Mul", ["x", "half"], ["h"]), N("Mul", ["h", "p"], ["y"])], consts),
        # 0.5 * x as Div by 2
        "div_two": (erf_div + [N("Div", ["x", "two"], ["h"]), N("Mul", ["p", "h"], ["y"])], {**consts, "two": 2.0}),
    }


@pytest.mark.parametrize("form", list(_erf_gelu_orderings()))
def test_erf_gelu_decompositions_are_gelu(form):
    nodes, consts = _erf_gelu_orderings()[form]
    model = _graph(nodes, consts)
    act = match_activation(_output(model))
    assert act is not None and act.kind == "gelu"
    assert act.input is model.graph.inputs[0]
    assert act.output is _output(model)
    assert {n.op_type for n in act.nodes} >= {"Erf", "Add", "Mul"}
    assert len(act.nodes) == len(nodes)


def _tanh_gelu(cube):
    consts = {"three": 3.0, "c": 0.044715, "k": GELU_TANH_C, "one": 1.0, "half": 0.5}
    power = [N("Pow", ["x", "three"], ["x3"])] if cube == "pow" else [
        N("Mul", ["x", "x"], ["x2"]), N("Mul", ["x2", "x"], ["x3"])]
    return power + [
        N("Mul", ["x3", "c"], ["cx3"]), N("Add", ["x", "cx3"], ["inner"]), N("Mul", ["inner", "k"], ["arg"]),
        N("Tanh", ["arg"], ["t"]), N("Add", ["t", "one"], ["p"]), N("Mul", ["x", "half"], ["h"]),
        N("Mul", ["h", "p"], ["y"]),
    ], consts


@pytest.mark.parametrize("cube", ["pow", "mul"])
def test_tanh_gelu_decomposition_is_gelu_tanh(cube):
    nodes, consts = _tanh_gelu(cube)
    act = match_activation(_output(_graph(nodes, consts)))
    assert act is not None and act.kind == "gelu_tanh"
    assert len(act.nodes) == len(nodes)


@pytest.mark.parametrize("approximate,kind", [("none", "gelu"), ("tanh", "gelu_tanh")])
def test_gelu_op(approximate, kind):
    model = _graph([N("Gelu", ["x"], ["y"], approximate=approximate)], opset=20)
    act = match_activation(model.graph.node(0))  # a node works as well as its output
    assert act.kind == kind and [n.op_type for n in act.nodes] == ["Gelu"]


@pytest.mark.parametrize("nodes,opset", [
    ([N("Sigmoid", ["x"], ["s"]), N("Mul", ["x", "s"], ["y"])], 18),
    ([N("Sigmoid", ["x"], ["s"]), N("Mul", ["s", "x"], ["y"])], 18),
    ([N("Swish", ["x"], ["y"])], 24),
])
def test_silu_forms(nodes, opset):
    act = match_activation(_output(_graph(nodes, opset=opset)))
    assert act is not None and act.kind == "silu" and len(act.nodes) == len(nodes)


def test_quick_gelu_is_not_silu():
    nodes = [N("Mul", ["x", "a"], ["ax"]), N("Sigmoid", ["ax"], ["s"]), N("Mul", ["x", "s"], ["y"])]
    assert match_activation(_output(_graph(nodes, {"a": 1.702}))).kind == "quick_gelu"


def test_hardswish_is_not_recognized():
    assert match_activation(_output(_graph([N("HardSwish", ["x"], ["y"])], opset=22))) is None


@pytest.mark.parametrize("nodes,consts,kind", [
    ([N("Relu", ["x"], ["y"])], {}, "relu"),
    ([N("Max", ["x", "zero"], ["y"])], {"zero": 0.0}, "relu"),
    ([N("Tanh", ["x"], ["y"])], {}, "tanh"),
    ([N("Sigmoid", ["x"], ["y"])], {}, "sigmoid"),
    ([N("Relu", ["x"], ["r"]), N("Pow", ["r", "two"], ["y"])], {"two": 2.0}, "relu2"),
    ([N("Relu", ["x"], ["r"]), N("Mul", ["r", "r"], ["y"])], {}, "relu2"),
])
def test_relu_family_and_squashing(nodes, consts, kind):
    act = match_activation(_output(_graph(nodes, consts)))
    assert act is not None and act.kind == kind and len(act.nodes) == len(nodes)


def test_leaky_relu_reports_alpha():
    act = match_activation(_output(_graph([N("LeakyRelu", ["x"], ["y"], alpha=0.2)])))
    assert act.kind == "leaky_relu" and act.params["alpha"] == pytest.approx(0.2)


def test_squared_relu_prefers_input_of_relu():
    # Relu(x)**2 is also "square of Relu(x)"; the whole relu2 subgraph is reported.
    model = _graph([N("Relu", ["x"], ["r"]), N("Pow", ["r", "two"], ["y"])], {"two": 2.0})
    act = match_activation(_output(model))
    assert act.input is model.graph.inputs[0]


def test_shared_intermediate_is_not_replaceable():
    # The Sigmoid output is also a graph output: replacing x*Sigmoid(x) would break it.
    model = _graph([N("Sigmoid", ["x"], ["s"]), N("Mul", ["x", "s"], ["y"])], extra_outputs=("s",))
    assert match_activation(_output(model)) is None
    assert match_activation(_output(model, "s")).kind == "sigmoid"


def test_unknown_functions_are_none():
    assert match_activation(_output(_graph([N("Exp", ["x"], ["y"])]))) is None
    assert match_activation(_output(_graph([N("Mul", ["x", "c"], ["y"])], {"c": 3.0}))) is None
    # A graph input has no producer at all.
    assert match_activation(_graph([N("Relu", ["x"], ["y"])]).graph.inputs[0]) is None


def test_vector_constant_stops_the_subgraph():
    # Relu(x + bias): the bias Add is a linear's, not part of the activation.
    inits = [numpy_helper.from_array(np.arange(4, dtype=np.float32), "bias")]
    graph = helper.make_graph([N("Add", ["x", "bias"], ["xb"]), N("Relu", ["xb"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], initializer=inits)
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    act = match_activation(_output(model))
    assert act.kind == "relu" and act.input.name == "xb"


def test_constant_nodes_are_part_of_the_subgraph():
    const = lambda name, v: N("Constant", [], [name], value=numpy_helper.from_array(np.array(v, np.float32)))  # noqa: E731
    nodes = [const("sqrt2", SQRT2), const("one", 1.0), const("half", 0.5),
             N("Div", ["x", "sqrt2"], ["d"]), N("Erf", ["d"], ["e"]), N("Add", ["e", "one"], ["p"]),
             N("Mul", ["x", "p"], ["m"]), N("Mul", ["m", "half"], ["y"])]
    act = match_activation(_output(_graph(nodes)))
    assert act.kind == "gelu" and len(act.nodes) == 8
    assert [n.op_type for n in act.nodes[:3]] == ["Constant"] * 3

