"""measure: the graph is unchanged and the report's per-layer sparsity matches numpy."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from actsparse.calibrate.data import generate_calibration
from actsparse.errors import ActsparseError
from actsparse.frontend.onnx_file import load_model
from actsparse.ir.blocks import find_blocks
from actsparse.passes import PassContext, PassSpec, make_pass, run_pipeline
from actsparse.passes.measure import measure_sparsity
from tests.onnx_models import if_model


def _relu_mlp(seed: int = 0):
    """x[3,8] -> MatMul(w1)+b1 -> Relu -> MatMul(w2) -> y[3,4]; returns (ir.Model, weights)."""
    rng = np.random.default_rng(seed)
    w = {"w1": rng.standard_normal((8, 16)).astype(np.float32),
         "b1": rng.standard_normal(16).astype(np.float32),
         "w2": rng.standard_normal((16, 4)).astype(np.float32)}
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
             helper.make_node("Add", ["h", "b1"], ["hb"], name="fc1_bias"),
             helper.make_node("Relu", ["hb"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="fc2")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 4])],
                              initializer=[numpy_helper.from_array(v, k) for k, v in w.items()])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    return ir.serde.deserialize_model(proto), w


def _samples(count=6, seed=1):
    rng = np.random.default_rng(seed)
    samples = [{"x": rng.standard_normal((3, 8)).astype(np.float32)} for _ in range(count)]
    samples[0]["x"][0, :3] = 0.0  # a few exact zeros in the first linear's input too
    return samples


def _measure(model, samples, **options):
    pass_ = make_pass("measure", options, PassContext(calibration=samples))
    result = pass_(model)
    return result, pass_.report


def test_relu_model_zero_fraction_matches_numpy():
    model, w = _relu_mlp()
    samples = _samples()
    before = ir.serde.serialize_model(model).SerializeToString()
    result, report = _measure(model, samples)
    # The graph is unchanged.
    assert not result.modified
    assert ir.serde.serialize_model(result.model).SerializeToString() == before
    x = np.concatenate([s["x"] for s in samples])
    relu = np.maximum(x @ w["w1"] + w["b1"], 0)
    expected = [float(np.mean(x == 0)), float(np.mean(relu == 0))]
    assert [layer["name"] for layer in report["layers"]] == ["fc1", "fc2"]
    assert [layer["sparsity"] for layer in report["layers"]] == pytest.approx(expected, abs=1e-4)
    assert expected[0] > 0 and 0.2 < expected[1] < 0.8  # both layers have something to count
    assert [layer["shape"] for layer in report["layers"]] == [[8, 16], [16, 4]]
    bytes_ = [8 * 16 * 4, 16 * 4 * 4]
    assert [layer["weight_bytes"] for layer in report["layers"]] == bytes_
    assert report["linears"] == 2
    assert report["mean_sparsity"] == pytest.approx(np.mean(expected), abs=1e-4)
    assert report["skippable_weight_fraction"] == pytest.approx(
        (expected[0] * bytes_[0] + expected[1] * bytes_[1]) / sum(bytes_), abs=1e-4)


def test_eps_counts_small_values_as_zero():
    model, w = _relu_mlp()
    samples = _samples()
    _, report = _measure(model, samples, eps="0.5")
    x = np.concatenate([s["x"] for s in samples])
    relu = np.maximum(x @ w["w1"] + w["b1"], 0)
    assert [layer["sparsity"] for layer in report["layers"]] == pytest.approx(
        [np.mean(np.abs(x) <= 0.5), np.mean(relu <= 0.5)], abs=1e-4)


def test_measure_is_exact_in_a_verified_pipeline():
    model, _ = _relu_mlp()
    _, (record,) = run_pipeline(model, [PassSpec("measure")], PassContext(calibration=_samples()))
    assert record.exact and not record.modified and record.vs_previous.within(0.0)


def test_model_without_linears_reports_nothing():
    model = ir.serde.deserialize_model(if_model())
    report = measure_sparsity(model, [{"cond": np.array(True), "x": np.ones(3, np.float32)}])
    assert report == {"layers": [], "skippable_weight_fraction": 0.0, "linears": 0}


def test_errors():
    model, _ = _relu_mlp()
    with pytest.raises(ActsparseError, match="needs calibration data"):
        make_pass("measure")(model)
    with pytest.raises(ActsparseError, match="eps must be >= 0"):
        make_pass("measure", {"eps": "-0.1"})


def test_relufied_bert_down_inputs_are_sparse(bert_onnx):
    """After relufy, BERT's FFN down projections read ReLU outputs: roughly half zeros."""
    model = load_model(bert_onnx)
    samples = generate_calibration(model, 2)
    model, records = run_pipeline(model, [PassSpec("relufy"), PassSpec("measure")], PassContext(calibration=samples))
    layers = {layer["name"]: layer["sparsity"] for layer in records[1].report["layers"]}
    assert records[1].report["linears"] == 12
    downs = [name for name, sparsity in layers.items() if sparsity > 0.2]
    assert downs == [block.down.name for block in find_blocks(model).ffn]  # those two, nothing else
    assert all(0.2 < layers[name] < 0.9 for name in downs)
