"""prune: magnitude (layer/global) and N:M along K, shared weights, numerics through onnxruntime."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from actsparse.errors import ActsparseError
from actsparse.passes import PassContext, PassSpec, make_pass, run_pipeline
from actsparse.passes.prune import global_magnitude_masks, magnitude_mask, nm_mask
from actsparse.ir.ort_session import ort_session

RNG = np.random.default_rng(0)


def two_layer_model(*, gemm_trans_b=False, shared=False) -> ir.Model:
    """x[4, 16] -> fc1 (MatMul [16, 32], or Gemm transB with [32, 16]) -> Relu -> fc2 MatMul [32, 8] * 0.1.
    shared: fc1's weight is also read by an Identity that is a graph output (a tied tensor)."""
    w1 = RNG.standard_normal((16, 32)).astype(np.float32)
    w2 = 0.1 * RNG.standard_normal((32, 8)).astype(np.float32)
    if gemm_trans_b:
        fc1 = helper.make_node("Gemm", ["x", "w1"], ["h"], transB=1, name="fc1")
        w1 = np.ascontiguousarray(w1.T)
    else:
        fc1 = helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1")
    nodes = [fc1, helper.make_node("Relu", ["h"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 8])]
    if shared:
        nodes.append(helper.make_node("Identity", ["w1"], ["w1_copy"]))
        outputs.append(helper.make_tensor_value_info("w1_copy", TensorProto.FLOAT, list(w1.shape)))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])], outputs,
                              [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))


def prune(model, options):
    p = make_pass("prune", options)
    return p(model).model, p.report


def array(model, name):
    return model.graph.initializers[name].const_value.numpy()


def test_magnitude_per_layer():
    model = two_layer_model()
    before = {name: array(model, name).copy() for name in ("w1", "w2")}
    pruned, report = prune(model, {"sparsity": "0.75"})
    assert [n.op_type for n in pruned.graph] == ["MatMul", "Relu", "MatMul"]  # weights changed in place
    for name, layer in zip(("w1", "w2"), report["layers"]):
        w, original = array(pruned, name), before[name]
        assert layer["sparsity"] == 0.75 and np.mean(w == 0) == 0.75
        kept = w != 0
        assert np.abs(original[~kept]).max() <= np.abs(original[kept]).min()  # the smallest went
        np.testing.assert_array_equal(w[kept], original[kept])
    x = {"x": RNG.standard_normal((4, 16)).astype(np.float32)}
    expected = np.maximum(x["x"] @ array(pruned, "w1"), 0) @ array(pruned, "w2")
    np.testing.assert_allclose(ort_session(pruned).run(None, x)[0], expected, rtol=1e-5, atol=1e-6)


def test_magnitude_global_uses_one_threshold():
    model = two_layer_model()  # fc2's weights are 10x smaller: a global threshold prunes it more
    original = np.concatenate([np.abs(array(model, name)).ravel() for name in ("w1", "w2")])
    pruned, report = prune(model, {"sparsity": "0.5", "scope": "global"})
    s1, s2 = (l["sparsity"] for l in report["layers"])
    assert s2 > 0.9 and s1 < 0.5
    assert report["sparsity_reached"] == 0.5
    kept = np.concatenate([array(pruned, name).ravel() != 0 for name in ("w1", "w2")])
    assert original[~kept].max() <= original[kept].min()


@pytest.mark.parametrize("gemm_trans_b", [False, True])
def test_nm_along_input_dimension(gemm_trans_b):
    model = two_layer_model(gemm_trans_b=gemm_trans_b)
    original = array(model, "w1").copy()
    pruned, report = prune(model, {"method": "nm", "n": "2", "m": "4"})
    w1 = array(pruned, "w1")
    w_kn = w1.T if gemm_trans_b else w1  # [K=16, N=32]
    groups = (w_kn != 0).reshape(4, 4, 32)  # 4 groups of 4 consecutive K rows per column
    assert (groups.sum(axis=1) == 2).all()
    original_kn = (original.T if gemm_trans_b else original).reshape(4, 4, 32)
    kept = np.abs(original_kn) * groups
    dropped = np.where(groups, np.inf, np.abs(original_kn))
    assert (np.sort(kept, axis=1)[:, 2, :] >= dropped.min(axis=1)).all()  # the 2 largest stayed
    assert [l["sparsity"] for l in report["layers"]] == [0.5, 0.5]


def test_nm_mask_reference():
    w = np.array([[1., -4.], [-3., 1.], [2., 2.], [0.5, -3.]])
    np.testing.assert_array_equal(nm_mask(w, 2, 4), [[False, True], [True, False], [True, False], [False, True]])
    np.testing.assert_array_equal(nm_mask(w, 1, 2), [[False, True], [True, False], [True, False], [False, True]])
    np.testing.assert_array_equal(nm_mask(w, 3, 4), [[True, True], [True, False], [True, True], [False, True]])


def test_nm_skips_layers_with_k_not_multiple_of_m():
    model = two_layer_model()
    _, report = prune(model, {"method": "nm", "n": "2", "m": "3"})
    assert [l["name"] for l in report["layers"]] == []
    assert {s["name"] for s in report["skipped"]} == {"fc1", "fc2"}  # K = 16 and 32


def test_shared_weight_is_copied_first():
    model = two_layer_model(shared=True)
    original = array(model, "w1").copy()
    pruned, report = prune(model, {"sparsity": "0.5"})
    assert report["copied_shared_weights"] == 1
    fc1 = next(n for n in pruned.graph if n.name == "fc1")
    assert fc1.inputs[1].name != "w1" and np.mean(fc1.inputs[1].const_value.numpy() == 0) == 0.5
    x = {"x": RNG.standard_normal((4, 16)).astype(np.float32)}
    _, w1_copy = ort_session(pruned).run(None, x)
    np.testing.assert_array_equal(w1_copy, original)  # the other reader still sees the dense tensor


def test_masks():
    w = RNG.standard_normal((10, 10))
    assert magnitude_mask(w, 0.0).all() and not magnitude_mask(w, 1.0).any()
    assert magnitude_mask(w, 0.33).sum() == 67
    masks = global_magnitude_masks([w, 10 * w], 0.5)
    assert masks[0].sum() < masks[1].sum() and sum(m.sum() for m in masks) == 100


@pytest.mark.parametrize("options, message", [
    ({"sparsity": "1.5"}, r"sparsity must be in \[0, 1\]"),
    ({"method": "nm", "n": "5", "m": "4"}, "N:M needs 0 <= n <= m"),
    ({"method": "random"}, "'random' is not one of magnitude, nm"),
    ({"scope": "model"}, "'model' is not one of layer, global"),
])
def test_bad_options(options, message):
    with pytest.raises(ActsparseError, match=message):
        make_pass("prune", options)


def test_pipeline_reports_accuracy():
    model = two_layer_model()
    calib = [{"x": RNG.standard_normal((4, 16)).astype(np.float32)} for _ in range(2)]
    _, records = run_pipeline(model, [PassSpec("prune", {"sparsity": "0.1"})], PassContext(calibration=calib))
    assert 0.9 < records[0].vs_original.cosine < 1.0
    assert records[0].report["sparsity_reached"] == pytest.approx(0.1, abs=1e-3)  # rounded per layer
