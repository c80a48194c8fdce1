"""Lowering of actsparse.RankSparseMatMul: the fused batch-1 kernel at one token on a CPU, an
expansion into SparsifyWeighted + MatMuls elsewhere; compiled outputs equal onnxruntime's."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

pytest.importorskip("tvm")

import actsparse  # noqa: E402
from actsparse.codegen.compile import compile_model  # noqa: E402
from actsparse.codegen.lower import specialize_shapes  # noqa: E402
from actsparse.codegen.lowering.ops import RANK_SPARSE_LINEAR  # noqa: E402
from actsparse.codegen.lowering.rsparse import select_rank_sparse_kernels  # noqa: E402
from actsparse.ir.custom_ops import RANK_SPARSE_MATMUL, SPARSIFY_WEIGHTED  # noqa: E402
from actsparse.frontend.zoo import swiglu_stack  # noqa: E402

D, F = 64, 176
RSPARSE = "rsparse{sparsity=0.5,sparse_ratio=0.5,scope=ffn}"


def _inputs(count: int = 3, tokens: int = 1, seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((tokens, D)).astype(np.float32) for _ in range(count)]


def _optimized(tokens: int = 1):
    return actsparse.optimize(swiglu_stack(tokens=tokens), passes=RSPARSE,
                              calib=[{"x": x} for x in _inputs(8, tokens, seed=2)])


def _ort(optimized, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(optimized.to_onnx().SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def _ops(model: ir.Model) -> list[str]:
    return [node.op_type for node in model.graph]


# ------------------------------------------------------------------ structural (no TVM build)

def test_one_token_becomes_one_kernel_node_per_linear():
    model = specialize_shapes(_optimized().model, {"x": (1, D)})
    w_down = model.graph.initializers["layers.0.mlp.down_proj.weight"].const_value.numpy()
    plan = select_rank_sparse_kernels(model, lanes=8)
    assert [entry["kernel"] for entry in plan] == ["rsparse"] * 6
    assert _ops(model).count(RANK_SPARSE_LINEAR) == 6 and RANK_SPARSE_MATMUL not in _ops(model)
    down = next(n for n in model.graph if n.name.startswith("layers.0.mlp.down_proj"))
    rank = int(down.attributes["rank"].value)
    a_panels, wb = (v.const_value.numpy() for v in down.inputs[3:])
    assert a_panels.shape == (4, F, -(-rank // 32) * 8) and wb.shape == (F + rank, D)
    np.testing.assert_array_equal(wb[:F], w_down)


def test_more_rows_are_expanded_into_plain_ops():
    model = specialize_shapes(_optimized(tokens=4).model, {"x": (4, D)})
    assert select_rank_sparse_kernels(model) == []
    ops = _ops(model)
    assert RANK_SPARSE_MATMUL not in ops and ops.count(SPARSIFY_WEIGHTED) == 6 and ops.count("MatMul") == 18


# ------------------------------------------------------------------ compiled numerics

@pytest.mark.parametrize("tokens", [1, 4])
def test_compiled_matches_onnxruntime(tmp_path, tokens):
    optimized = _optimized(tokens)
    result = compile_model(optimized.model, "host", tmp_path / "m.actsparse", input_shapes={"x": (tokens, D)})
    kinds = [entry["kernel"] for entry in result.kernels]
    if tokens == 1:
        assert kinds == ["rsparse"] * 6
    else:  # kept rows through the sparse-input kernel, the low-rank factors through dense ones
        assert kinds.count("scaled") == 6 and kinds.count("dense") == 12
    model = actsparse.load(result.path)
    for x in _inputs(tokens=tokens):
        np.testing.assert_allclose(model.run(x=x)["y"], _ort(optimized, x), atol=1e-4, rtol=0)
