"""predictor pass: structure (PredictActive* -> Mul -> down), the ops' ORT numerics vs numpy,
recall calibration, refusals."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper

from actsparse.errors import ActsparseError
from actsparse.frontend.onnx_file import load_model
from actsparse.ir.blocks import find_blocks
from actsparse.passes import PassContext, make_pass
from actsparse.ir.custom_ops import _predict_active_proto as _function_proto
from actsparse.passes.predictor import OPS, select, threshold_for_recall
from actsparse.ir.ort_session import ort_session
from tests.models import SEQ_LEN, VOCAB


def _calibration(count: int = 12):
    rng = np.random.default_rng(0)
    return [{"input_ids": rng.integers(0, VOCAB, (1, SEQ_LEN)).astype(np.int64)} for _ in range(count)]


@pytest.fixture
def relufied_llama(llama_onnx):
    context = PassContext(calibration=_calibration())
    return make_pass("relufy", {}, context)(load_model(llama_onnx)).model


def _predict(model, **options):
    p = make_pass("predictor", {"rank": 8, "steps": 60, **options}, PassContext(calibration=_calibration()))
    return p(model).model, p.report


@pytest.mark.parametrize("mode", ["threshold", "topk", "statistical"])
def test_mask_multiplies_the_down_input(relufied_llama, mode):
    blocks = find_blocks(relufied_llama).ffn
    expected = {b.down.node.name: (b.hidden.name, (b.gate or b.up).input.name) for b in blocks}
    model, report = _predict(relufied_llama, mode=mode)
    assert len(report["layers"]) == len(blocks)
    downs = {n.name: n for n in model.graph if n.name in expected}
    for name, (hidden, ffn_input) in expected.items():
        mul = downs[name].inputs[0].producer()
        assert mul.op_type == "Mul" and mul.inputs[0].name == hidden
        predict = mul.inputs[1].producer()
        assert (predict.domain, predict.op_type) == ("actsparse", OPS[mode])
        assert predict.inputs[0].name == ffn_input
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto)
    out = ort_session(model).run(None, _calibration(1)[0])[0]
    assert np.isfinite(out).all()
    for layer in report["layers"]:
        assert 0 <= layer["recall"] <= 1 and 0 <= layer["precision"] <= 1
    if mode != "threshold":
        assert report["predicted_active_mean"] == pytest.approx(0.3, abs=0.08)


def _op_model(op: str, x, a, b, bias, param):
    names = ["x", "a", "b", "bias", "param"]
    arrays = [x, a, b, bias, param]
    inputs = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
              for n, v in zip(names, arrays)]
    node = helper.make_node(op, names, ["mask"], domain="actsparse")
    mask = helper.make_tensor_value_info("mask", 1, [*x.shape[:-1], b.shape[1]])
    graph = helper.make_graph([node], "g", inputs, [mask])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("actsparse", 1)],
                              functions=[_function_proto(op, 18)])
    onnx.checker.check_model(model)
    return model


@pytest.mark.parametrize("mode", ["threshold", "topk", "statistical"])
def test_ops_match_the_numpy_reference(mode):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 5, 16)).astype(np.float32)
    a = rng.standard_normal((16, 4)).astype(np.float32)
    b = rng.standard_normal((4, 40)).astype(np.float32)
    bias = rng.standard_normal(40).astype(np.float32)
    param = {"threshold": np.array(0.5, np.float32), "topk": np.array([7], np.int64),
             "statistical": np.array(0.8, np.float32)}[mode]
    model = _op_model(OPS[mode], x, a, b, bias, param)
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    mask = session.run(None, {"x": x, "a": a, "b": b, "bias": bias, "param": param})[0]
    expected = select(x @ a @ b + bias, mode, float(param.reshape(-1)[0]))
    np.testing.assert_array_equal(mask, expected.astype(np.float32))
    if mode == "topk":
        assert (mask.sum(-1) == 7).all()


def test_threshold_keeps_the_requested_recall():
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((500, 30))
    labels = logits + 0.5 * rng.standard_normal((500, 30)) > 1.0
    t = threshold_for_recall(logits, labels, 0.9)
    recall = (logits[labels] > t).mean()
    assert 0.9 <= recall < 0.92


def test_refuses_smooth_ffns_and_bad_options(llama_onnx):
    with pytest.raises(ActsparseError, match="relufy"):
        _predict(load_model(llama_onnx))
    with pytest.raises(ActsparseError, match="rank"):
        make_pass("predictor", {"rank": 0})
    with pytest.raises(ActsparseError, match="active"):
        make_pass("predictor", {"active": 1.5})
    with pytest.raises(ActsparseError, match="calibration"):
        make_pass("predictor", {})(load_model(llama_onnx))
