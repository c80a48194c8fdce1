"""float16 models compile onto the project's float32 kernels (weights widened at compile time),
keep their float16 interface, and match onnxruntime's float16 run."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, numpy_helper

import actsparse
from actsparse.frontend import zoo


def _float16(model: onnx.ModelProto) -> onnx.ModelProto:
    for init in model.graph.initializer:
        init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), init.name))
    model.graph.input[0].type.tensor_type.elem_type = TensorProto.FLOAT16
    model.graph.output[0].type.tensor_type.elem_type = TensorProto.FLOAT16
    onnx.checker.check_model(model)
    return model


def test_float16_swiglu_runs_on_our_kernels(tmp_path):
    onnx.save(_float16(zoo.swiglu_stack(layers=2, d=64, f=128)), tmp_path / "fp16.onnx")
    art = actsparse.compile(str(tmp_path / "fp16.onnx"), output=tmp_path / "fp16.actsparse")
    assert "tvm" not in {k["kernel"] for k in art.kernels}, art.kernels
    model = art.load()
    assert model.inputs[0]["dtype"] == "float16" and model.outputs[0]["dtype"] == "float16"
    assert model.manifest["report"]["float16"] == "computed in float32"
    x = np.random.default_rng(0).standard_normal((1, 64)).astype(np.float16)
    expected = ort.InferenceSession(str(tmp_path / "fp16.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = model.run(x=x)["y"]
    assert got.dtype == np.float16
    np.testing.assert_allclose(got.astype(np.float32), expected.astype(np.float32), rtol=2e-2, atol=2e-2)


def test_float16_sparsify_keeps_the_model_dtype(tmp_path):
    onnx.save(_float16(zoo.swiglu_stack(layers=2, d=32, f=64)), tmp_path / "fp16.onnx")
    for method in ("teal", "wina", "cats"):
        result = actsparse.optimize(str(tmp_path / "fp16.onnx"), passes=f"sparsify{{method={method},sparsity=0.5}}")
        proto = result.to_onnx()
        thresholds = [i for i in proto.graph.initializer if "threshold" in i.name]
        assert thresholds and all(t.data_type == TensorProto.FLOAT16 for t in thresholds)
        art = actsparse.compile(result.model, output=tmp_path / f"{method}.actsparse",
                                example_inputs={"x": np.zeros((1, 32), np.float16)})
        assert art.run(x=np.ones((1, 32), np.float16))["y"].dtype == np.float16


def test_float16_chess_keeps_the_model_dtype(tmp_path):
    """chess's per-channel scales are float16 in a float16 model (onnxruntime refused the float32
    ones), and the result compiles."""
    onnx.save(_float16(zoo.swiglu_stack(layers=2, d=32, f=64)), tmp_path / "fp16.onnx")
    result = actsparse.optimize(str(tmp_path / "fp16.onnx"), passes="chess")
    scales = [i for i in result.to_onnx().graph.initializer if "chess" in i.name]
    assert scales and all(s.data_type == TensorProto.FLOAT16 for s in scales)
    art = actsparse.compile(result.model, output=tmp_path / "chess.actsparse",
                            example_inputs={"x": np.zeros((1, 32), np.float16)})
    assert art.run(x=np.ones((1, 32), np.float16))["y"].dtype == np.float16


def test_float16_quantize_keeps_the_interface_and_compiles_to_int_kernels(tmp_path):
    """quantize refused float16 models ("no linear layer with a constant float32 weight"): it now
    widens them to float32 first, keeps the float16 inputs and outputs, and says so."""
    onnx.save(_float16(zoo.swiglu_stack(layers=2, d=32, f=64)), tmp_path / "fp16.onnx")
    x = np.random.default_rng(0).standard_normal((1, 32)).astype(np.float16)
    for bits, kernel in ((8, "int8"), (4, "int4")):
        result = actsparse.optimize(str(tmp_path / "fp16.onnx"), passes=f"quantize{{bits={bits}}}")
        report = result.records[-1].report
        assert report["float16"] == "computed in float32" and report["quantized"] == 6
        assert report["weight_bytes_before"] == 6 * 32 * 64 * 2  # counted at their float16 size
        proto = result.to_onnx()
        assert proto.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
        assert proto.graph.output[0].type.tensor_type.elem_type == TensorProto.FLOAT16
        expected = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        art = actsparse.compile(result.model, output=tmp_path / f"q{bits}.actsparse", example_inputs={"x": x})
        assert {k["kernel"].split("_")[0] for k in art.kernels} == {kernel}, art.kernels
        got = art.run(x=x)["y"]
        assert got.dtype == np.float16
        np.testing.assert_allclose(got.astype(np.float32), expected.astype(np.float32), atol=0.1)
