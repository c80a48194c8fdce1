"""The `actsparse` custom ops: their ONNX-function bodies run in onnxruntime at old and new
opsets and match numpy; the helpers that add them keep names unique and nodes in order."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from actsparse.ir.custom_ops import (
    DOMAIN, SPARSIFY, SPARSIFY_WEIGHTED, VERSION, add_initializer, ensure_function, insert_sparsify, is_sparsify,
    unique_name, unique_node_name,
)
from actsparse.passes.verify import check_model, run_onnxruntime

OPSETS = [13, 21]


def _identity_model(opset: int, dtype=TensorProto.FLOAT, shape=(4, 6)) -> ir.Model:
    """x -> Identity -> y: a graph whose only job is to carry a Sparsify node."""
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["x_copy"], name="copy")], "g",
                              [helper.make_tensor_value_info("x", dtype, list(shape))],
                              [helper.make_tensor_value_info("x_copy", dtype, list(shape))])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    proto.ir_version = 8 if opset <= 17 else 10
    return ir.serde.deserialize_model(proto)


def _sparsify_model(opset: int, threshold: float, scale: np.ndarray | None = None,
                    dtype=np.float32, shape=(4, 6)) -> ir.Model:
    """y = Sparsify(Identity(x), t) (or SparsifyWeighted with `scale`) as the graph output."""
    model = _identity_model(opset, helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), shape)
    x_copy = model.graph.node("copy").outputs[0]
    t = add_initializer(model, "t", np.array(threshold, dtype=dtype))
    s = add_initializer(model, "scale", scale.astype(dtype)) if scale is not None else None
    y = insert_sparsify(model, x_copy, t, s, name="sparsify")
    model.graph.outputs[0] = y
    return model


def _ties_and_signs(rng, shape=(4, 6)) -> np.ndarray:
    """Random values plus exact ties with the threshold 0.5, negatives and zeros."""
    x = rng.standard_normal(shape).astype(np.float32)
    x.flat[:4] = [0.5, -0.5, 0.0, -2.0]
    return x


@pytest.mark.parametrize("opset", OPSETS)
def test_sparsify_body_matches_numpy(opset):
    model = _sparsify_model(opset, 0.5)
    check_model(model, "test")
    x = _ties_and_signs(np.random.default_rng(opset))
    (y,) = run_onnxruntime(model, {"x": x})
    np.testing.assert_array_equal(y, np.where(np.abs(x) > 0.5, x, 0.0))
    assert y.flat[0] == 0.0 and y.flat[1] == 0.0 and y.flat[3] == -2.0  # ties drop, signs stay


@pytest.mark.parametrize("opset", OPSETS)
def test_sparsify_weighted_body_matches_numpy(opset):
    rng = np.random.default_rng(opset)
    scale = np.array([0.0, 1.0, 2.0, 0.25, 4.0, 1.0], np.float32)  # a zero scale: that channel always drops
    model = _sparsify_model(opset, 0.5, scale)
    check_model(model, "test")
    x = _ties_and_signs(rng)
    (y,) = run_onnxruntime(model, {"x": x})
    np.testing.assert_array_equal(y, np.where(np.abs(x) * scale > 0.5, x, 0.0))
    assert not y[:, 0].any()


@pytest.mark.parametrize("opset", OPSETS)
def test_negative_threshold_keeps_everything(opset):
    """Threshold -1 is what sparsify uses for 'sparsity 0': zeros pass through as zeros."""
    model = _sparsify_model(opset, -1.0)
    x = _ties_and_signs(np.random.default_rng(0))
    np.testing.assert_array_equal(run_onnxruntime(model, {"x": x})[0], x)


def test_function_bodies_are_declared_once_with_the_models_opset():
    model = _identity_model(21)
    for op in (SPARSIFY, SPARSIFY, SPARSIFY_WEIGHTED):
        ensure_function(model, op)
    assert sorted(model.functions) == [(DOMAIN, SPARSIFY, ""), (DOMAIN, SPARSIFY_WEIGHTED, "")]
    assert model.opset_imports[DOMAIN] == VERSION
    for function in model.functions.values():
        assert function.opset_imports[""] == 21
        assert [n.op_type for n in function][-2:] == ["Sub", "Where"]
    inputs = {f.name: [v.name for v in f.inputs] for f in model.functions.values()}
    assert inputs == {SPARSIFY: ["x", "threshold"], SPARSIFY_WEIGHTED: ["x", "threshold", "channel_scale"]}


def test_ensure_function_rejects_unknown_ops():
    with pytest.raises(ValueError, match="unknown actsparse op 'Densify'"):
        ensure_function(_identity_model(17), "Densify")


def test_insert_sparsify_places_the_node_after_the_producer_and_names_it_uniquely():
    model = _identity_model(17)
    x_copy = model.graph.node("copy").outputs[0]
    t = add_initializer(model, "t", np.array(0.1, np.float32))
    first = insert_sparsify(model, x_copy, t, name="sp")
    second = insert_sparsify(model, x_copy, t, name="sp")
    nodes = list(model.graph)
    assert [n.name for n in nodes] == ["copy", "sp_1", "sp"]  # each right after `copy`
    assert first.name == "x_copy_sparse" and second.name == "x_copy_sparse_1"
    assert all(is_sparsify(n) for n in nodes[1:]) and not is_sparsify(nodes[0])
    assert first.shape == x_copy.shape and first.dtype == x_copy.dtype
    # the caller rewires readers: the graph output still reads the dense value
    assert model.graph.outputs[0] is x_copy


def test_insert_sparsify_on_a_graph_input_goes_first():
    model = _identity_model(17)
    x = model.graph.inputs[0]
    t = add_initializer(model, "t", np.array(0.1, np.float32))
    insert_sparsify(model, x, t, name="sp")
    assert [n.op_type for n in model.graph] == [SPARSIFY, "Identity"]


def test_unique_names_avoid_inputs_initializers_outputs_and_nodes():
    model = _identity_model(17)
    add_initializer(model, "w", np.zeros(2, np.float32))
    assert unique_name(model, "x") == "x_1"
    assert unique_name(model, "x_copy") == "x_copy_1"
    assert unique_name(model, "w") == "w_1"
    assert unique_name(model, "fresh") == "fresh"
    assert unique_node_name(model, "copy") == "copy_1"
    second = add_initializer(model, "w", np.ones(3, np.float32))
    assert second.name == "w_1"
    np.testing.assert_array_equal(second.const_value.numpy(), np.ones(3, np.float32))


def test_saved_model_with_custom_ops_passes_the_full_checker(tmp_path):
    model = _sparsify_model(17, 0.3, np.ones(6))
    path = tmp_path / "m.onnx"
    onnx.save_model(ir.serde.serialize_model(model), path)
    onnx.checker.check_model(str(path), full_check=True)
    proto = onnx.load(path)
    assert {(o.domain, o.version) for o in proto.opset_import} == {("", 17), (DOMAIN, VERSION)}
    assert [f.name for f in proto.functions] == [SPARSIFY_WEIGHTED]


@pytest.mark.parametrize("weighted", [False, True])
def test_sparsify_body_runs_on_float16(weighted):
    scale = np.ones(6, np.float32) if weighted else None
    model = _sparsify_model(17, 0.5, scale, dtype=np.float16)
    x = _ties_and_signs(np.random.default_rng(0)).astype(np.float16)
    (y,) = run_onnxruntime(model, {"x": x})
    np.testing.assert_array_equal(y, np.where(np.abs(x) > np.float16(0.5), x, np.float16(0)))


def test_sparsify_in_a_model_with_a_matmul_matches_numpy():
    """Sanity check of how sparsify uses the op: y = Sparsify(x, t) @ W."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((6, 5)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="fc")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 5])],
                              initializer=[numpy_helper.from_array(w, "w")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    model = ir.serde.deserialize_model(proto)
    fc = model.graph.node("fc")
    t = add_initializer(model, "t", np.array(0.7, np.float32))
    fc.replace_input_with(0, insert_sparsify(model, fc.inputs[0], t, name="sp"))
    x = rng.standard_normal((4, 6)).astype(np.float32)
    (y,) = run_onnxruntime(model, {"x": x})
    np.testing.assert_allclose(y, np.where(np.abs(x) > 0.7, x, 0) @ w, rtol=1e-5, atol=1e-6)
