"""Fused gated FFN lowering: each pattern compiled and run against onnxruntime on the same
optimized ONNX, the kernel plan it records, and the cases that must not fuse.

The model is a tiny 2-layer SwiGLU stack (d 64, f 176); every pattern compiles once per module.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

pytest.importorskip("tvm")

import actsparse  # noqa: E402
from actsparse.codegen.compile import compile_model  # noqa: E402
from actsparse.codegen.lowering.ffn_fusion import FORMS, fuse_ffn_blocks, fused_forms  # noqa: E402
from actsparse.codegen.lowering.ops import FUSED_FFN  # noqa: E402
from actsparse.codegen.lower import specialize_shapes  # noqa: E402
from actsparse.frontend.zoo import swiglu_stack  # noqa: E402

D, F = 64, 176
ATOL = 1e-4
TEAL = "sparsify{method=teal,sparsity=0.5,scope=ffn}"

# name -> (passes, fused forms enabled, kernel expected for every FFN block)
PATTERNS = {
    "relu": ("relufy", None, "ffn_gate_sparse"),
    "shifted_relu": ("relufy{act=shifted_relu,shift=0.3}", None, "ffn_gate_sparse"),
    "cats": ("cleanup,sparsify{method=cats,sparsity=0.5}", None, "ffn_gate_sparse"),
    "teal": (TEAL, None, "ffn_input_sparse"),
    "teal_per_linear": (TEAL, {"ffn_gate_sparse"}, None),
    "wina": ("sparsify{method=wina,sparsity=0.5,scope=ffn}", None, None),
    "dense": ("cleanup", None, "ffn_dense"),
    "dense_per_linear": ("cleanup", {"ffn_gate_sparse"}, None),
}


def _inputs(count: int = 3, tokens: int = 1, seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((tokens, D)).astype(np.float32) for _ in range(count)]


def _calibration(tokens: int = 1) -> list[dict[str, np.ndarray]]:
    return [{"x": x} for x in _inputs(8, tokens, seed=2)]


def _ort(model_proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.fixture(scope="module", params=list(PATTERNS))
def compiled(request, tmp_path_factory):
    """(pattern name, optimized model, loaded artifact, kernel plan)."""
    passes, forms, _ = PATTERNS[request.param]
    optimized = actsparse.optimize(swiglu_stack(), passes=passes, calib=_calibration())
    output = tmp_path_factory.mktemp(request.param) / "model.actsparse"
    result = compile_model(optimized.model, "host", output, input_shapes={"x": (1, D)}, fused_ffn_forms=forms or None)
    return request.param, optimized, actsparse.load(result.path), result.kernels


def test_compiled_matches_onnxruntime(compiled):
    _, optimized, model, _ = compiled
    proto = optimized.to_onnx()
    for x in _inputs():
        np.testing.assert_allclose(model.run(x=x)["y"], _ort(proto, x), atol=ATOL, rtol=0)


def test_plan_records_the_fused_kernel(compiled):
    name, _, _, plan = compiled
    expected = PATTERNS[name][2]
    if expected is None:  # per-linear kernels only
        assert all(entry["kernel"] not in FORMS for entry in plan)
        assert len(plan) == 6
        return
    assert [entry["name"] for entry in plan] == ["layers.0.mlp", "layers.1.mlp"]
    for index, entry in enumerate(plan):
        assert entry["kernel"] == expected
        assert entry["shape"] == [D, F]
        assert entry["linears"] == [f"layers.{index}.mlp.{p}_proj" for p in ("gate", "up", "down")]
    if name == "relu":
        assert all(e["act"] == "relu" and e["threshold"] == 0.0 and "shift" not in e for e in plan)
    if name == "shifted_relu":
        assert all(e["act"] == "relu" and e["shift"] == pytest.approx(0.3) for e in plan)
    if name == "cats":
        assert all(e["act"] == "silu" and e["threshold"] > 0 for e in plan)
    if name == "teal":
        assert all(e["input_threshold"] > 0 and e["down_threshold"] > 0 for e in plan)


def test_per_linear_kernels_where_not_fused(compiled):
    name, _, _, plan = compiled
    kinds = {entry["kernel"] for entry in plan}
    if name == "teal_per_linear":
        assert kinds == {"threshold"}
    elif name == "wina":
        assert kinds == {"scaled"}
    elif name == "dense_per_linear":
        assert kinds == {"dense"}


# ------------------------------------------------------------------ structural (no TVM build)

def _specialized(passes: str, tokens: int = 1, proto: onnx.ModelProto | None = None) -> ir.Model:
    model = actsparse.optimize(proto or swiglu_stack(tokens=tokens), passes=passes,
                               calib=_calibration(tokens)).model
    return specialize_shapes(model, {"x": (tokens, D)})


def _ops(model: ir.Model) -> list[str]:
    return [node.op_type for node in model.graph]


def test_fusion_replaces_the_block_by_one_node():
    model = _specialized("relufy")
    plan = fuse_ffn_blocks(model)
    assert len(plan) == 2
    ops = _ops(model)
    assert ops.count(FUSED_FFN) == 2
    assert "MatMul" not in ops and "Relu" not in ops and "Mul" not in ops
    node = next(n for n in model.graph if n.op_type == FUSED_FFN)
    wg, wu_t, wd = (v.const_value.numpy() for v in node.inputs[2:])
    original = {t.name: onnx.numpy_helper.to_array(t) for t in swiglu_stack().graph.initializer}
    np.testing.assert_array_equal(wu_t, original["layers.0.mlp.up_proj.weight"].T)
    np.testing.assert_array_equal(wd, original["layers.0.mlp.down_proj.weight"])
    assert wg.shape[1:] == (D, wg.shape[2]) and wg.shape[0] * wg.shape[2] >= F


def test_no_fusion_beyond_one_token():
    model = _specialized("relufy", tokens=4)
    assert fuse_ffn_blocks(model) == []
    assert FUSED_FFN not in _ops(model)


def test_no_fusion_when_an_inner_value_is_read_outside():
    proto = swiglu_stack()
    proto.graph.output.append(onnx.helper.make_tensor_value_info("layers.0.mlp.up", onnx.TensorProto.FLOAT, [1, F]))
    model = _specialized("relufy", proto=proto)
    plan = fuse_ffn_blocks(model)
    assert [entry["name"] for entry in plan] == ["layers.1.mlp"]


def test_no_fusion_for_forms_without_a_kernel():
    assert fuse_ffn_blocks(_specialized("relufy{act=relu2}")) == []
    # TEAL on the down input only: ffn_input_sparse needs both thresholds.
    assert fuse_ffn_blocks(_specialized("sparsify{method=teal,sparsity=0.5,scope=down}")) == []


def test_dense_block_folds_its_residual_add():
    model = _specialized("cleanup")
    plan = fuse_ffn_blocks(model)
    assert [e["kernel"] for e in plan] == ["ffn_dense"] * 2 and all(e.get("residual") for e in plan)
    assert [n.op_type for n in model.graph] == [FUSED_FFN, FUSED_FFN]  # the Adds went into the kernels
    assert model.graph.outputs[0].producer().op_type == FUSED_FFN and model.graph.outputs[0].name == "y"


def test_residual_add_stays_when_the_ffn_output_is_read_elsewhere():
    proto = swiglu_stack()
    proto.graph.output.append(onnx.helper.make_tensor_value_info("layers.1.mlp.down", onnx.TensorProto.FLOAT, [1, D]))
    model = _specialized("cleanup", proto=proto)
    plan = fuse_ffn_blocks(model)
    assert [bool(e.get("residual")) for e in plan] == [True, False]
    assert [n.op_type for n in model.graph] == [FUSED_FFN, FUSED_FFN, "Add"]


def test_enabled_forms_rejects_unknown_forms():
    with pytest.raises(ValueError, match="unknown fused FFN forms"):
        fused_forms(["ffn_magic"])


def test_batch_model_keeps_per_linear_kernels_and_matches(tmp_path):
    optimized = actsparse.optimize(swiglu_stack(tokens=4), passes="relufy", calib=_calibration(4))
    result = compile_model(optimized.model, "host", tmp_path / "m.actsparse", input_shapes={"x": (4, D)})
    assert [e["kernel"] for e in result.kernels] == ["dense", "dense", "nonzero"] * 2
    x = _inputs(1, tokens=4)[0]
    np.testing.assert_allclose(actsparse.load(result.path).run(x=x)["y"], _ort(optimized.to_onnx(), x), atol=ATOL)
