"""relufy: Before/Expected graphs, numerics against a numpy ReLU model, and the tiny
BERT / GPT-2 / Llama exports."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from actsparse.calibrate.data import generate_calibration
from actsparse.frontend.onnx_file import load_model
from actsparse.ir.blocks import find_blocks
from actsparse.passes import PassContext, make_pass, parse_pipeline, run_pipeline
from actsparse.passes.verify import check_model, run_onnxruntime
from tests.models import gelu_mlp_stack, swiglu_stack


def _relufy(model: ir.Model, **options):
    """Run the pass; return (model, report)."""
    pass_ = make_pass("relufy", {k: str(v) for k, v in options.items()})
    result = pass_(model)
    return result.model, pass_.report, result.modified


def _ops(model: ir.Model) -> list[str]:
    return [node.op_type for node in model.graph]


def _gelu_stack(layers: int = 1, tokens: int = 3) -> ir.Model:
    return ir.serde.deserialize_model(gelu_mlp_stack(layers=layers, tokens=tokens))


def _stack_weights(proto: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}


def _numpy_gelu_stack(proto: onnx.ModelProto, x: np.ndarray, act) -> np.ndarray:
    """The stack of tests.models.gelu_mlp_stack with `act` in place of GELU: h += act(h W1^T + b1) W2 + b2."""
    w = _stack_weights(proto)
    h = x.astype(np.float64)
    layer = 0
    while f"layers.{layer}.mlp.fc1.weight" in w:
        p = f"layers.{layer}.mlp"
        u = h @ w[f"{p}.fc1.weight"].T + w[f"{p}.fc1.bias"]
        h = h + act(u) @ w[f"{p}.fc2.weight"] + w[f"{p}.fc2.bias"]
        layer += 1
    return h


# ------------------------------------------------------------------ Before / Expected

def test_before_expected_erf_gelu_becomes_relu():
    before = _gelu_stack()
    assert _ops(before) == ["Gemm", "Div", "Erf", "Add", "Mul", "Mul", "MatMul", "Add", "Add", "Identity"]
    after, report, modified = _relufy(before)
    # Expected: the Erf decomposition (5 nodes) is one Relu between fc1 and fc2.
    assert _ops(after) == ["Gemm", "Relu", "MatMul", "Add", "Add", "Identity"]
    gemm, relu, fc2 = after.graph.node(0), after.graph.node(1), after.graph.node(2)
    assert relu.inputs[0] is gemm.outputs[0] and fc2.inputs[0] is relu.outputs[0]
    # The GELU's scalar constants went with it.
    assert not {"sqrt2", "one", "half"} & set(after.graph.initializers)
    assert modified and report == {"replaced": 1, "by_kind": {"gelu": 1}, "act": "relu"}
    check_model(after, "relufy")


def test_before_expected_relu2_squares_one_relu():
    after, report, _ = _relufy(_gelu_stack(), act="relu2")
    assert _ops(after) == ["Gemm", "Relu", "Mul", "MatMul", "Add", "Add", "Identity"]
    relu, square, fc2 = after.graph.node(1), after.graph.node(2), after.graph.node(3)
    assert list(square.inputs) == [relu.outputs[0], relu.outputs[0]]
    assert fc2.inputs[0] is square.outputs[0]
    assert report["act"] == "relu2"


def test_before_expected_shifted_relu_subtracts_a_scalar_initializer():
    after, _, _ = _relufy(_gelu_stack(), act="shifted_relu", shift=0.25)
    assert _ops(after) == ["Gemm", "Sub", "Relu", "MatMul", "Add", "Add", "Identity"]
    gemm, sub, relu = after.graph.node(0), after.graph.node(1), after.graph.node(2)
    assert sub.inputs[0] is gemm.outputs[0] and relu.inputs[0] is sub.outputs[0]
    shift = sub.inputs[1].const_value.numpy()
    assert shift.shape == () and shift.dtype == np.float32 and shift == np.float32(0.25)


def test_before_expected_swiglu_keeps_the_gate_multiply():
    before = ir.serde.deserialize_model(swiglu_stack(layers=1))
    after, report, _ = _relufy(before)
    # Before: gate, Sigmoid, Mul (SiLU), up, Mul (gate * up), down, residual Add, Identity.
    assert _ops(after) == ["MatMul", "Relu", "MatMul", "Mul", "MatMul", "Add", "Identity"]
    gate, relu, up, mul = (after.graph.node(i) for i in range(4))
    assert relu.inputs[0] is gate.outputs[0]
    assert set(mul.inputs) == {relu.outputs[0], up.outputs[0]}
    assert report["by_kind"] == {"silu": 1}
    block = find_blocks(after).ffn[0]
    assert block.kind == "gated" and block.activation.kind == "relu"


def _ffn_plus_side_gelu() -> ir.Model:
    """y = fc2(Gelu(fc1(x))) + Gelu(x): one GELU inside an FFN block, one outside (opset 20 Gelu op)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("w1", (8, 16)), ("w2", (16, 8)))]
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["u"], name="fc1"),
        helper.make_node("Gelu", ["u"], ["a"], name="ffn_gelu"),
        helper.make_node("MatMul", ["a", "w2"], ["f"], name="fc2"),
        helper.make_node("Gelu", ["x"], ["side"], name="side_gelu"),
        helper.make_node("Add", ["f", "side"], ["y"], name="sum"),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])], initializer=inits)
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]))


def test_scope_ffn_leaves_other_activations_and_scope_all_replaces_them():
    after_ffn, report, _ = _relufy(_ffn_plus_side_gelu(), scope="ffn")
    assert _ops(after_ffn) == ["MatMul", "Relu", "MatMul", "Gelu", "Add"]
    assert report["replaced"] == 1
    after_all, report, _ = _relufy(_ffn_plus_side_gelu(), scope="all")
    assert _ops(after_all) == ["MatMul", "Relu", "MatMul", "Relu", "Add"]
    assert after_all.graph.node(3).inputs[0] is after_all.graph.inputs[0]
    assert report == {"replaced": 2, "by_kind": {"gelu": 2}, "act": "relu"}


def _relu_mlp() -> ir.Model:
    """x -> MatMul -> Relu -> MatMul: already ReLU, nothing for relufy to do."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
             for n, s in (("w1", (8, 16)), ("w2", (16, 8)))]
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["u"], name="fc1"), helper.make_node("Relu", ["u"], ["a"]),
             helper.make_node("MatMul", ["a", "w2"], ["y"], name="fc2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])], initializer=inits)
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def test_no_smooth_activation_leaves_the_model_alone():
    before = _relu_mlp()
    expected = ir.serde.serialize_model(before).SerializeToString()
    after, report, modified = _relufy(before, scope="all")
    assert not modified and report["replaced"] == 0
    assert ir.serde.serialize_model(after).SerializeToString() == expected


def test_activation_that_is_a_graph_output_keeps_the_output_name():
    graph = helper.make_graph([helper.make_node("Gelu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]))
    after, _, _ = _relufy(model, scope="all")
    assert _ops(after) == ["Relu"]
    assert [v.name for v in after.graph.outputs] == ["y"]


# ------------------------------------------------------------------ numerics

@pytest.mark.parametrize("act, options, reference", [
    ("relu", {}, lambda u: np.maximum(u, 0)),
    ("relu2", {}, lambda u: np.maximum(u, 0) ** 2),
    ("shifted_relu", {"shift": 0.3}, lambda u: np.maximum(u - 0.3, 0)),
])
def test_output_equals_a_numpy_relu_model(act, options, reference):
    proto = gelu_mlp_stack(layers=2, tokens=5)
    after, _, _ = _relufy(ir.serde.deserialize_model(proto), act=act, **options)
    x = np.random.default_rng(1).standard_normal((5, 64)).astype(np.float32)
    (y,) = run_onnxruntime(after, {"x": x})
    np.testing.assert_allclose(y, _numpy_gelu_stack(proto, x, reference), rtol=1e-4, atol=1e-4)
    # and the model really changed: GELU's output differs from ReLU's
    (original,) = run_onnxruntime(ir.serde.deserialize_model(proto), {"x": x})
    assert np.max(np.abs(original - y)) > 1e-3


def test_relu_hidden_values_are_exactly_zero_where_the_input_is_not_positive():
    proto = gelu_mlp_stack(layers=1, tokens=4)
    after, _, _ = _relufy(ir.serde.deserialize_model(proto))
    relu = after.graph.node(1)
    after.graph.outputs.append(relu.outputs[0])
    after.graph.outputs.append(relu.inputs[0])
    x = np.random.default_rng(2).standard_normal((4, 64)).astype(np.float32)
    _, hidden, pre = run_onnxruntime(after, {"x": x})
    assert np.array_equal(hidden == 0, pre <= 0)
    assert 0.3 < np.mean(hidden == 0) < 0.7


# ------------------------------------------------------------------ tiny transformers

@pytest.mark.parametrize("fixture, kind", [("bert_onnx", "gelu"), ("gpt2_onnx", "gelu_tanh"), ("llama_onnx", "silu")])
@pytest.mark.parametrize("act", ["relu", "relu2", "shifted_relu"])
def test_tiny_transformers(request, fixture, kind, act):
    model = load_model(request.getfixturevalue(fixture))
    samples = generate_calibration(model, 2)
    options = {"act": act} | ({"shift": "0.1"} if act == "shifted_relu" else {})
    spec = parse_pipeline("relufy")[0]
    spec.options = options
    after, (record,) = run_pipeline(model, [spec], PassContext(calibration=samples))  # checker + ORT inside
    assert record.report["by_kind"] == {kind: 2} and record.modified
    if act == "shifted_relu":
        assert sum(n.op_type == "Sub" and n.name.endswith("_shift_sub") for n in after.graph) == 2
    else:  # the blocks are still found, now with the new activation
        blocks = find_blocks(after)
        assert [b.activation.kind for b in blocks.ffn] == [act, act]
    # approximate, not broken: the outputs stay finite and correlated with the original
    assert record.vs_original.max_abs_error > 0
    assert np.isfinite(record.vs_original.max_abs_error)
    outputs = run_onnxruntime(after, samples[0])
    assert all(np.isfinite(o).all() for o in outputs)


def test_tiny_llama_scope_all_replaces_only_the_ffn_silus(llama_onnx):
    after, report, _ = _relufy(load_model(llama_onnx), scope="all")
    assert report["by_kind"] == {"silu": 2}
    assert not any(n.op_type == "Sigmoid" for n in after.graph)


def test_nothing_to_replace_means_nothing_removed():
    from tests.onnx_models import mlp_with_foldable_constants

    before = ir.serde.deserialize_model(mlp_with_foldable_constants())  # has a dead Neg node
    nodes_before = _ops(before)
    after, _, modified = _relufy(before, scope="all")
    assert modified or _ops(after) == nodes_before
