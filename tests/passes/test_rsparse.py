"""rsparse pass: RankSparseMatMul = exact rows of kept channels + a low-rank weight for the rest."""

from __future__ import annotations

import math
from unittest import mock

import numpy as np
import onnx_ir as ir
import pytest

import actsparse.passes  # noqa: F401  before calibrate.stats (circular import otherwise)
from actsparse.calibrate.stats import as_rows, collect_values
from actsparse.errors import ActsparseError
from actsparse.ir.custom_ops import DOMAIN, RANK_SPARSE_MATMUL, SPARSIFY_WEIGHTED
from actsparse.passes import PassContext, PassSpec, make_pass, run_pipeline
from actsparse.passes import rsparse as rsparse_module
from actsparse.passes.rsparse import DROP_ALL, SPARSE_RATIOS, activation_factors, choose_split, rank_for
from actsparse.passes.verify import check_model, run_onnxruntime
from tests.models import gelu_mlp_stack, swiglu_stack

D, F = 64, 176  # swiglu_stack sizes
TOKENS = 4


def _swiglu(layers: int = 1) -> ir.Model:
    return ir.serde.deserialize_model(swiglu_stack(layers=layers, tokens=TOKENS))


def _samples(count: int = 16, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((TOKENS, D)).astype(np.float32)} for _ in range(count)]


def _rsparse(model: ir.Model, samples, **options):
    pass_ = make_pass("rsparse", options, PassContext(calibration=samples))
    result = pass_(model)
    return result.model, pass_.report, result.modified


def _ops(model: ir.Model) -> list[str]:
    return [f"{n.domain}.{n.op_type}" if n.domain else n.op_type for n in model.graph]


def _weights(model: ir.Model) -> dict[str, np.ndarray]:
    return {name: v.const_value.numpy() for name, v in model.graph.initializers.items()}


def _rank_sparse_reference(x, threshold, scale, w, a, b):
    keep = np.abs(x) * scale > threshold
    x64 = x.astype(np.float64)
    return np.where(keep, x64, 0) @ w + (np.where(keep, 0, x64) @ a) @ b


# ------------------------------------------------------------------ Before / Expected

def test_before_expected_scope_down():
    model = _swiglu()
    assert _ops(model) == ["MatMul", "Sigmoid", "Mul", "MatMul", "Mul", "MatMul", "Add", "Identity"]
    w_down = _weights(model)["layers.0.mlp.down_proj.weight"]

    after, report, modified = _rsparse(model, _samples(), scope="down", sparsity=0.5, sparse_ratio=0.5)

    # Expected: down_proj's MatMul becomes one RankSparseMatMul on the same hidden value, reading
    # the model's own weight tensor (no copy) and two low-rank factors of the budgeted rank.
    assert _ops(after) == ["MatMul", "Sigmoid", "Mul", "MatMul", "Mul", f"{DOMAIN}.{RANK_SPARSE_MATMUL}", "Add",
                           "Identity"]
    (node,) = [n for n in after.graph if n.domain == DOMAIN]
    x, threshold, scale, weight, a, b = node.inputs
    assert x.name == "layers.0.mlp.hidden" and weight.name == "layers.0.mlp.down_proj.weight"
    rank = rank_for(0.5, 0.5, F, D)
    assert rank == int(0.5 * 0.5 * F * D / (F + D))
    assert a.shape == ir.Shape([F, rank]) and b.shape == ir.Shape([rank, D])
    assert threshold.const_value.numpy().shape == ()
    np.testing.assert_allclose(scale.const_value.numpy(), np.linalg.norm(w_down, axis=1), rtol=1e-6)
    # A @ B is the best rank-r approximation of W (Eckart-Young: the residual is the tail of Σ).
    s = np.linalg.svd(w_down.astype(np.float64), compute_uv=False)
    residual = np.linalg.norm(w_down - a.const_value.numpy() @ b.const_value.numpy())
    assert residual == pytest.approx(math.sqrt(np.sum(s[rank:] ** 2)), rel=1e-4)
    assert modified and after.opset_imports[DOMAIN] == 1 and (DOMAIN, RANK_SPARSE_MATMUL, "") in after.functions
    (layer,) = report["layers"]
    assert layer["name"] == "layers.0.mlp.down_proj" and layer["rank"] == rank and layer["sparse_ratio"] == 0.5
    assert layer["calibrated_kept"] == pytest.approx(0.25, abs=0.01)
    check_model(after, "rsparse")


def test_before_expected_scope_ffn_rewrites_gate_up_down_and_keeps_residual_dense():
    after, report, _ = _rsparse(_swiglu(layers=2), _samples(), scope="ffn", sparsity=0.6,
                                sparse_ratio=0.5)
    nodes = [n for n in after.graph if n.domain == DOMAIN]
    assert len(nodes) == 6 and len(report["layers"]) == 6
    assert not [n for n in after.graph if n.op_type == "MatMul"]
    g = after.graph.node
    assert g("layers.1/residual").inputs[0] is g("layers.0/residual").outputs[0]
    gate_up_inputs = [n.inputs[0] for n in nodes if "gate_proj" in n.name or "up_proj" in n.name]
    assert {v.name for v in gate_up_inputs} == {"x", g("layers.0/residual").outputs[0].name}


# ------------------------------------------------------------------ numerics through onnxruntime

@pytest.mark.parametrize("ratio", [0.0, 0.3, 0.7])
def test_onnxruntime_output_equals_numpy_split(ratio):
    model = _swiglu()
    after, report, _ = _rsparse(model, _samples(), scope="down", sparsity=0.5, sparse_ratio=ratio)
    t = _weights(after)
    x = _samples(1, seed=7)[0]["x"]
    hidden = collect_values(after, ["layers.0.mlp.hidden"], [{"x": x}])["layers.0.mlp.hidden"][0]
    base = "layers.0.mlp.down_proj"
    down = _rank_sparse_reference(hidden, t[f"{base}.rsparse_threshold"], t[f"{base}.rsparse_scale"],
                                  t[f"{base}.weight"], t[f"{base}.rsparse_lowrank_in"], t[f"{base}.rsparse_lowrank_out"])
    (y,) = run_onnxruntime(after, {"x": x})
    np.testing.assert_allclose(y, x + down, rtol=1e-4, atol=1e-4)
    if ratio == 0.0:  # no kept rows: every channel goes through the rank
        assert t[f"{base}.rsparse_threshold"] == DROP_ALL and report["layers"][0]["calibrated_kept"] == 0


def test_gemm_with_bias_and_transposed_weight_numerics():
    model = ir.serde.deserialize_model(gelu_mlp_stack(layers=1, tokens=TOKENS))
    w = _weights(model)
    after, _, _ = _rsparse(model, _samples(), scope="ffn", sparsity=0.5, sparse_ratio=0.5)
    assert not [n for n in after.graph if n.op_type == "Gemm"]
    t = _weights(after)
    x = _samples(1, seed=9)[0]["x"]

    def linear(v, name, weight):
        return _rank_sparse_reference(v, t[f"{name}.rsparse_threshold"], t[f"{name}.rsparse_scale"],
                                      t[weight], t[f"{name}.rsparse_lowrank_in"],
                                      t[f"{name}.rsparse_lowrank_out"])

    fc1, fc2 = "layers.0.mlp.fc1", "layers.0.mlp.fc2"
    # The Gemm's [N, K] weight is stored once more as [K, N]; the MatMul's is read as it is.
    np.testing.assert_allclose(t[f"{fc1}.weight_kn"], w[f"{fc1}.weight"].T)
    assert f"{fc2}.weight_kn" not in t
    u = linear(x, fc1, f"{fc1}.weight_kn") + w[f"{fc1}.bias"]
    hidden = 0.5 * u * (1 + np.vectorize(math.erf)(u / np.sqrt(2)))
    y = x + linear(hidden.astype(np.float32), fc2, f"{fc2}.weight") + w[f"{fc2}.bias"]
    np.testing.assert_allclose(run_onnxruntime(after, {"x": x})[0], y, rtol=1e-3, atol=1e-3)


def test_all_budget_on_rows_is_a_weighted_threshold():
    after, report, _ = _rsparse(_swiglu(), _samples(), scope="down", sparsity=0.5, sparse_ratio=1.0)
    (node,) = [n for n in after.graph if n.domain == DOMAIN]
    assert node.op_type == SPARSIFY_WEIGHTED and report["layers"][0]["rank"] == 0
    assert after.graph.node("layers.0.mlp.down_proj").inputs[0] is node.outputs[0]


def test_through_the_verified_pipeline():
    out, (record,) = run_pipeline(_swiglu(2), [PassSpec("rsparse", {"sparsity": 0.5})],
                                  PassContext(calibration=_samples()))
    assert record.report["sparsity_weighted"] == 0.5
    assert record.vs_original.cosine > 0.9


def test_chained_linears_each_read_the_previous_rewrite():
    """scope=linears on x -> MatMul -> MatMul: the second op reads the first op's output."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(5)
    inits = [numpy_helper.from_array(rng.standard_normal((16, 24)).astype(np.float32), "w0"),
             numpy_helper.from_array(rng.standard_normal((24, 8)).astype(np.float32), "w1")]
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h"], name="first"),
             helper.make_node("MatMul", ["h", "w1"], ["y"], name="second")]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])], inits)
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    samples = [{"x": rng.standard_normal((2, 16)).astype(np.float32)} for _ in range(8)]
    after, _, _ = _rsparse(model, samples, scope="linears", sparsity=0.5, sparse_ratio=0.5)
    first, second = [n for n in after.graph if n.domain == DOMAIN]
    assert second.inputs[0] is first.outputs[0] and [o.name for o in after.graph.outputs] == ["y"]
    check_model(after, "rsparse")
    assert run_onnxruntime(after, samples[0])[0].shape == (2, 8)


# ------------------------------------------------------------------ budget and split search

def test_bytes_read_match_the_budget():
    _, report, _ = _rsparse(_swiglu(2), _samples(), scope="ffn", sparsity=0.6)
    for layer in report["layers"]:
        k, n = layer["shape"]
        budget = 0.4 * k * n
        read = layer["sparse_ratio"] * 0.4 * k * n + layer["rank"] * (k + n)
        assert budget - (k + n) < read <= budget + 1e-6  # the rank is rounded down by less than one
        assert layer["read_fraction"] == pytest.approx(0.4, abs=0.03)  # kept fraction measured on calibration
    assert report["calibrated_read_fraction"] == pytest.approx(0.4, abs=0.02)


def test_split_search_error_is_the_direct_error_and_the_grid_minimum():
    rng = np.random.default_rng(3)
    k, n = 48, 80
    # A weight with a decaying spectrum and activations with a few large channels, like an LLM's.
    weight = (rng.standard_normal((k, 8)) @ rng.standard_normal((8, n)) + 0.3 * rng.standard_normal((k, n)))
    rows = rng.standard_normal((300, k)) * np.where(rng.random(k) < 0.1, 8.0, 1.0)
    best = choose_split(rows, weight, 0.6, None)
    errors = {}
    for ratio in SPARSE_RATIOS:
        split = choose_split(rows, weight, 0.6, float(ratio))
        keep = np.abs(rows) * np.linalg.norm(weight, axis=1) > split.threshold
        u, s, vt = np.linalg.svd(weight, full_matrices=False)
        r = split.rank
        approx = np.where(keep, rows, 0) @ weight + np.where(keep, 0, rows) @ (u[:, :r] * s[:r]) @ vt[:r]
        direct = np.sum((rows @ weight - approx) ** 2) / np.sum((rows @ weight) ** 2)
        assert split.error == pytest.approx(direct, rel=1e-6, abs=1e-12)
        errors[float(ratio)] = direct
    assert best.error == pytest.approx(min(errors.values()), rel=1e-9)
    # On such a layer mixing pays: the best split beats all-rows (WINA) and all-rank alike.
    assert best.error < 0.8 * min(errors[1.0], errors[0.0]) and 0 < best.sparse_ratio < 1


def test_activation_basis_fits_the_dropped_inputs_better_than_the_weight_svd():
    """basis=activation minimizes the error over the dropped inputs themselves: at the same split it
    is never worse on those tokens, and with correlated inputs clearly better."""
    rng = np.random.default_rng(4)
    k, n = 40, 60
    weight = rng.standard_normal((k, n))
    rows = rng.standard_normal((500, 6)) @ rng.standard_normal((6, k)) + 0.1 * rng.standard_normal((500, k))
    for ratio in (0.2, 0.5):
        by_weight = choose_split(rows, weight, 0.5, ratio, "weight")
        by_activation = choose_split(rows, weight, 0.5, ratio, "activation")
        assert by_activation.rank == by_weight.rank and by_activation.threshold == by_weight.threshold
        assert by_activation.error < 0.8 * by_weight.error
        assert by_activation.lowrank_in.shape == (k, by_weight.rank)


def test_activation_basis_shrinks_to_the_weight_svd_when_calibration_rows_are_few():
    """With fewer calibration rows than channels and a flat input spectrum, fitting the dropped
    inputs alone over-fits: on fresh rows of the same distribution the ridge keeps the fit within
    a few % of W's own SVD. With many rows the ridge fades (the fit equals the unregularized one)."""
    k, n, rank = 64, 48, 8

    def heldout_ratio(seed: int, rows: int, ridge: float | None = None) -> float:
        rng = np.random.default_rng(seed)
        basis, _ = np.linalg.qr(rng.standard_normal((k, k)))
        scale = np.arange(1, k + 1) ** -0.25  # flat spectrum: every direction matters a little
        draw = lambda m: (rng.standard_normal((m, k)) * scale) @ basis.T  # noqa: E731
        weight, fit, fresh = rng.standard_normal((k, n)), draw(rows), draw(2000)
        with mock.patch.object(rsparse_module, "RIDGE", rsparse_module.RIDGE if ridge is None else ridge):
            a, b, _ = activation_factors(fit, weight, rank)
        u, s, vt = np.linalg.svd(weight, full_matrices=False)
        by_weight = fresh @ weight - fresh @ (u[:, :rank] * s[:rank]) @ vt[:rank]
        return float(np.linalg.norm(fresh @ weight - fresh @ a @ b) / np.linalg.norm(by_weight))

    assert np.median([heldout_ratio(seed, 16) for seed in range(8)]) < 1.03
    assert np.median([heldout_ratio(seed, 16, ridge=0.0) for seed in range(8)]) > 1.05  # what the ridge prevents
    assert heldout_ratio(0, 20000) == pytest.approx(heldout_ratio(0, 20000, ridge=0.0), rel=1e-3)


# ------------------------------------------------------------------ options and errors

def test_sparsity_zero_changes_nothing():
    after, report, modified = _rsparse(_swiglu(), _samples(), sparsity=0.0)
    assert not modified and _ops(after) == ["MatMul", "Sigmoid", "Mul", "MatMul", "Mul", "MatMul", "Add", "Identity"]
    assert report["skippable_weight_fraction"] == 0


def test_bad_options_and_inputs_are_clear_errors():
    with pytest.raises(ActsparseError, match="sparsity must be in"):
        make_pass("rsparse", {"sparsity": 1.0})
    with pytest.raises(ActsparseError, match="sparse_ratio must be in"):
        make_pass("rsparse", {"sparse_ratio": 1.5})
    with pytest.raises(ActsparseError, match="needs calibration"):
        make_pass("rsparse", {})(_swiglu())
    with pytest.raises(ActsparseError, match="no 'attention' linear layers"):
        _rsparse(_swiglu(), _samples(), scope="attention")


def test_pipeline_text_parses_none_and_numbers():
    from actsparse.passes import parse_pipeline

    (spec,) = parse_pipeline("rsparse{sparsity=0.7,sparse_ratio=none,scope=all}")
    p = make_pass(spec.name, spec.options)
    assert p.options.sparsity == 0.7 and p.options.sparse_ratio is None and p.options.scope == "all"
