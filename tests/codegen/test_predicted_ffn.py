"""The compiled predicted-neuron FFN: relufy -> predictor -> compile lowers each gated FFN block,
predictor included, to predict_active + ffn_indexed; outputs against onnxruntime on the same
predicted ONNX, the kernel plan, the predict_active kernel against the numpy reference.

The model is the tiny 2-layer SwiGLU stack (d 64, f 176); every mode compiles once per module.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

pytest.importorskip("tvm")

import actsparse  # noqa: E402
from actsparse.codegen.compile import compile_model  # noqa: E402
from actsparse.codegen.lowering.ffn_fusion import INDEXED, fuse_ffn_blocks  # noqa: E402
from actsparse.codegen.lowering.ops import FUSED_FFN  # noqa: E402
from actsparse.codegen.kernels.cpu.build import build_kernel  # noqa: E402
from actsparse.codegen.kernels.cpu.ffn import pack_predictor, predict_active  # noqa: E402
from actsparse.codegen.lower import specialize_shapes  # noqa: E402
from actsparse.ir.blocks import FFNBlock, find_blocks, find_linears  # noqa: E402
from actsparse.passes.predictor import _insert as insert_predictor  # noqa: E402
from actsparse.passes.predictor import select  # noqa: E402
from actsparse.frontend.zoo import swiglu_stack  # noqa: E402

D, F, RANK = 64, 176, 8
ATOL = 1e-4

# name -> (passes, predictor mode)
VARIANTS = {
    "threshold": ("relufy,predictor{mode=threshold,rank=8,steps=40}", "threshold"),
    "topk": ("relufy,predictor{mode=topk,rank=8,steps=40,active=0.2}", "topk"),
    "statistical": ("relufy,predictor{mode=statistical,rank=8,steps=40,active=0.2}", "statistical"),
    "shifted_relu": ("relufy{act=shifted_relu,shift=0.2}", "threshold"),  # predictor inserted by hand: see below
}


def _inputs(count: int, tokens: int = 1, seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((tokens, D)).astype(np.float32) for _ in range(count)]


def _calibration(tokens: int = 1) -> list[dict[str, np.ndarray]]:
    return [{"x": x} for x in _inputs(16, tokens, seed=2)]


def _predicted(name: str, tokens: int = 1):
    passes, _ = VARIANTS[name]
    optimized = actsparse.optimize(swiglu_stack(tokens=tokens), passes=passes, calib=_calibration(tokens))
    if name == "shifted_relu":
        _insert_random_predictors(optimized.model)
    return optimized


def _insert_random_predictors(model) -> None:
    """find_blocks does not see Relu(gate - shift) as a gated FFN, so the predictor pass refuses
    shifted-ReLU models; the kernel path takes them: insert untrained predictors directly."""
    linears = {lin.name: lin for lin in find_linears(model)}
    rng = np.random.default_rng(5)
    for i in range(2):
        gate, up, down = (linears[f"layers.{i}.mlp.{p}_proj"] for p in ("gate", "up", "down"))
        block = FFNBlock(f"layers.{i}.mlp", "gated", up, gate, down, None, down.input)
        a = rng.standard_normal((D, RANK)).astype(np.float32)
        b = rng.standard_normal((RANK, F)).astype(np.float32)
        insert_predictor(model, block, a, b, np.zeros(F, np.float32), "threshold", 0.5)


def _ort(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.fixture(scope="module", params=list(VARIANTS))
def compiled(request, tmp_path_factory):
    """(variant name, predicted model, loaded artifact, kernel plan)."""
    optimized = _predicted(request.param)
    output = tmp_path_factory.mktemp(request.param) / "model.actsparse"
    result = compile_model(optimized.model, "host", output, input_shapes={"x": (1, D)})
    return request.param, optimized, actsparse.load(result.path), result.kernels


def test_compiled_matches_onnxruntime(compiled):
    _, optimized, model, _ = compiled
    proto = optimized.to_onnx()
    for x in _inputs(6):
        np.testing.assert_allclose(model.run(x=x)["y"], _ort(proto, x), atol=ATOL, rtol=0)


def test_plan_names_the_indexed_kernel(compiled):
    name, _, _, plan = compiled
    mode = VARIANTS[name][1]
    assert [entry["name"] for entry in plan] == ["layers.0.mlp", "layers.1.mlp"]
    for entry in plan:
        assert entry["kernel"] == INDEXED and entry["act"] == "relu" and entry["shape"] == [D, F]
        assert entry["predictor"]["mode"] == mode and entry["predictor"]["rank"] == RANK
        if mode == "topk":
            assert entry["predictor"]["parameter"] == round(0.2 * F)
        assert ("shift" in entry) == (name == "shifted_relu")


def test_blocks_back_to_back(tmp_path):
    """Without the residual add, layer 1 reads layer 0's down output directly: both still fuse."""
    proto = swiglu_stack()
    for node in proto.graph.node:
        if node.op_type == "Add":  # h + down(...) -> down(...)
            node.op_type = "Identity"
            del node.input[0]
    optimized = actsparse.optimize(proto, passes=VARIANTS["topk"][0], calib=_calibration())
    result = compile_model(optimized.model, "host", tmp_path / "model.actsparse", input_shapes={"x": (1, D)})
    assert [entry["kernel"] for entry in result.kernels] == [INDEXED, INDEXED]
    model = actsparse.load(result.path)
    assert [o["name"] for o in model.outputs] == [v.name for v in optimized.model.graph.outputs]
    for x in _inputs(3):
        (y,) = model.run(x=x).values()
        np.testing.assert_allclose(y, _ort(optimized.to_onnx(), x), atol=ATOL, rtol=0)


# ------------------------------------------------------------------ structural (no TVM build)

def test_find_blocks_walks_through_the_predicted_mask():
    model = _predicted("threshold").model
    blocks = find_blocks(model).ffn
    assert [(b.name, b.kind) for b in blocks] == [("layers.0.mlp", "gated"), ("layers.1.mlp", "gated")]
    for index, block in enumerate(blocks):
        assert [lin.name for lin in block.linears] == [f"layers.{index}.mlp.{p}_proj" for p in ("gate", "up", "down")]
        assert block.activation.kind == "relu"
        assert block.hidden.producer().op_type == "Mul"  # the masked hidden the down projection reads


def test_fusion_replaces_the_block_and_its_predictor():
    model = specialize_shapes(_predicted("topk").model, {"x": (1, D)})
    assert len(fuse_ffn_blocks(model)) == 2
    ops = [node.op_type for node in model.graph]
    assert ops.count(FUSED_FFN) == 2
    assert not {"MatMul", "Relu", "Mul", "PredictActiveTopK"} & set(ops)


def test_no_fusion_beyond_one_token():
    model = specialize_shapes(_predicted("threshold", tokens=4).model, {"x": (4, D)})
    assert fuse_ffn_blocks(model) == []
    assert "PredictActive" in [node.op_type for node in model.graph]


# ------------------------------------------------------------------ the predictor kernel

@pytest.fixture(scope="module")
def predict_kernels():
    return {mode: build_kernel(predict_active(D, RANK, F, mode), "host", num_outputs=2)
            for mode in ("threshold", "topk", "statistical")}


@pytest.mark.parametrize("mode, param", [("threshold", 0.3), ("topk", 1), ("topk", 37), ("topk", F),
                                         ("statistical", 0.8), ("statistical", -0.5)])
def test_predict_active_matches_the_numpy_reference(predict_kernels, mode, param):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, D)).astype(np.float32)
    a = rng.standard_normal((D, RANK)).astype(np.float32)
    b = rng.standard_normal((RANK, F)).astype(np.float32)
    bias = rng.standard_normal(F).astype(np.float32)
    _check_selection(predict_kernels[mode], x, a, b, bias, mode, param)


def test_topk_keeps_ties_and_orders_negatives(predict_kernels):
    """A = 0 makes the logits the bias: repeated values, negative numbers and zeros of both signs."""
    rng = np.random.default_rng(4)
    bias = rng.choice(np.array([-3.5, -1.0, -0.0, 0.0, 0.25, 2.0, 7.0], np.float32), F)
    x = rng.standard_normal((1, D)).astype(np.float32)
    a, b = np.zeros((D, RANK), np.float32), rng.standard_normal((RANK, F)).astype(np.float32)
    for k in (1, 5, 40, 100, 170):
        _check_selection(predict_kernels["topk"], x, a, b, bias, "topk", k)


def _check_selection(kernel, x, a, b, bias, mode, param):
    param_array = np.array([param], np.int32 if mode == "topk" else np.float32)
    idx, nnz = kernel(x, *pack_predictor(a, b), bias, param_array)
    expected = np.nonzero(select(x @ a @ b + bias, mode, param)[0])[0]
    assert int(nnz[0]) == len(expected)
    np.testing.assert_array_equal(idx[: len(expected)], expected)
