"""rsparse allocation=greedy|evolutionary: per-linear sparsity at the uniform byte budget."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

import actsparse.passes  # noqa: F401  before calibrate.stats (circular import otherwise)
from actsparse.errors import ActsparseError
from actsparse.ir.custom_ops import DOMAIN, RANK_SPARSE_MATMUL, SPARSIFY_WEIGHTED
from actsparse.passes import make_pass
from actsparse.passes.rsparse import choose_split
from actsparse.passes.rsparse_allocation import KEPT_FRACTIONS, MAX_SPARSITY, PROBE_SAMPLES, linear_curve, mutate
from actsparse.passes.verify import check_model, run_onnxruntime

from tests.passes.test_rsparse import D, TOKENS, _samples  # noqa: E402,F401 (same model and calibration)
from tests.passes.test_rsparse import _rsparse as _rsparse_with_modified  # noqa: E402
from tests.passes.test_rsparse import _swiglu as _swiglu_stack  # noqa: E402


def _swiglu(layers: int = 2) -> ir.Model:
    return _swiglu_stack(layers)


def _rsparse(model: ir.Model, samples, **options):
    return _rsparse_with_modified(model, samples, **options)[:2]


def _low_rank(rng, k: int, n: int, rank: int) -> np.ndarray:
    """A weight with most of its energy in `rank` directions."""
    return rng.standard_normal((k, rank)) @ rng.standard_normal((rank, n)) / np.sqrt(rank) + 0.05 * rng.standard_normal((k, n))


def _chain(flat: np.ndarray, low_rank: np.ndarray) -> ir.Model:
    """x -> MatMul(flat) -> h -> MatMul(low_rank) -> y: two linears with opposite spectra."""
    k, m = flat.shape
    n = low_rank.shape[1]
    nodes = [helper.make_node("MatMul", ["x", "flat"], ["h"], name="flat_linear"),
             helper.make_node("MatMul", ["h", "low_rank"], ["y"], name="low_rank_linear")]
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [TOKENS, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [TOKENS, n])],
                              [numpy_helper.from_array(flat.astype(np.float32), "flat"),
                               numpy_helper.from_array(low_rank.astype(np.float32), "low_rank")])
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def _chain_model_and_samples():
    rng = np.random.default_rng(11)
    flat = np.linalg.qr(rng.standard_normal((48, 48)))[0]  # every singular value 1
    low_rank = _low_rank(rng, 48, 40, 4)
    scale = np.where(rng.random(48) < 0.1, 6.0, 1.0)  # a few large channels, as in LLM activations
    samples = [{"x": (rng.standard_normal((TOKENS, 48)) * scale).astype(np.float32)} for _ in range(16)]
    return _chain(flat, low_rank), samples


def _relative_output_error(model: ir.Model, dense: ir.Model, samples) -> float:
    diff = sum(float(np.sum((run_onnxruntime(model, s)[0].astype(np.float64) - run_onnxruntime(dense, s)[0]) ** 2))
               for s in samples)
    return diff / sum(float(np.sum(run_onnxruntime(dense, s)[0].astype(np.float64) ** 2)) for s in samples)


# ------------------------------------------------------------------ budget

@pytest.mark.parametrize("allocation", ["greedy", "evolutionary"])
def test_bytes_read_per_token_match_the_uniform_budget(allocation):
    _, report = _rsparse(_swiglu(), _samples(), scope="ffn", sparsity=0.6, allocation=allocation)
    layers = report["layers"]
    sizes = np.array([l["shape"][0] * l["shape"][1] for l in layers], dtype=np.float64)
    targets = np.array([l["target"] for l in layers])
    # The budgets: the bytes of uniform 60 %, redistributed, not the same everywhere.
    assert np.sum((1 - targets) * sizes) == pytest.approx(0.4 * np.sum(sizes), rel=1e-9)
    assert len(set(np.round(targets, 6))) > 1 and np.all((targets >= 0) & (targets <= MAX_SPARSITY + 1e-9))
    counted = 0.0
    for layer, size, target in zip(layers, sizes, targets):
        k, n = layer["shape"]
        read = layer["sparse_ratio"] * (1 - target) * size + layer["rank"] * (k + n)  # kept rows + A and B
        assert (1 - target) * size - (k + n) - 1e-6 < read <= (1 - target) * size + 1e-6
        assert np.any(np.isclose(layer["sparse_ratio"] * (1 - target), KEPT_FRACTIONS))
        counted += read
    assert 0.4 * np.sum(sizes) - sum(l["shape"][0] + l["shape"][1] for l in layers) < counted <= 0.4 * np.sum(sizes) + 1e-6
    assert report["sparsity_weighted"] == pytest.approx(0.6, abs=1e-4)


def test_mutation_moves_bytes_and_stays_in_bounds():
    rng = np.random.default_rng(0)
    weights = np.array([100.0, 400.0, 50.0])
    sparsities = np.array([0.5, 0.5, 0.5])
    for _ in range(200):
        moved = mutate(sparsities, weights, rng)
        assert np.dot(moved, weights) == pytest.approx(np.dot(sparsities, weights), rel=1e-12)
        assert np.all((moved >= -1e-12) & (moved <= MAX_SPARSITY + 1e-12))
        sparsities = moved
    assert not np.allclose(sparsities, 0.5)


# ------------------------------------------------------------------ search

def test_allocation_is_deterministic():
    runs = [_rsparse(*_chain_model_and_samples(), scope="linears", sparsity=0.5, allocation="evolutionary")
            for _ in range(2)]
    (model_a, report_a), (model_b, report_b) = runs
    assert [l["target"] for l in report_a["layers"]] == [l["target"] for l in report_b["layers"]]
    assert report_a["search"] == report_b["search"]
    for name, value in model_a.graph.initializers.items():
        np.testing.assert_array_equal(value.const_value.numpy(), model_b.graph.initializers[name].const_value.numpy())


def test_evolutionary_is_never_worse_than_its_seeds_and_reports_the_model_it_returns():
    model, samples = _chain_model_and_samples()
    dense = _chain(*(model.graph.initializers[n].const_value.numpy() for n in ("flat", "low_rank")))
    after, report = _rsparse(model, samples, scope="linears", sparsity=0.6, allocation="evolutionary")
    search = report["search"]
    assert search["evolutionary_output_error"] <= min(search["uniform_output_error"], search["greedy_output_error"])
    history = search["best_error_per_generation"]
    assert all(b <= a for a, b in zip(history, history[1:]))
    # The error the search saw is the returned model's, run in onnxruntime on the same samples.
    measured = _relative_output_error(after, dense, samples[:PROBE_SAMPLES])
    assert search["evolutionary_output_error"] == pytest.approx(measured, rel=1e-3)


def test_flat_spectrum_gets_rows_low_rank_spectrum_gets_rank():
    model, samples = _chain_model_and_samples()
    _, report = _rsparse(model, samples, scope="linears", sparsity=0.6, allocation="greedy")
    flat, low_rank = report["layers"]
    assert flat["name"] == "flat_linear" and low_rank["name"] == "low_rank_linear"
    # An orthogonal weight has nothing to gain from a low rank: its budget goes to rows.
    assert flat["rank"] < low_rank["rank"] and flat["sparse_ratio"] > low_rank["sparse_ratio"]
    # Four directions hold nearly all of the low-rank weight: skipping its bytes costs little,
    # so the allocation moves sparsity there.
    assert low_rank["target"] > 0.6 > flat["target"]


def test_curve_errors_are_the_closed_form_split_errors():
    rng = np.random.default_rng(3)
    k, n = 48, 80
    weight = _low_rank(rng, k, n, 8) + 0.3 * rng.standard_normal((k, n))
    rows = rng.standard_normal((300, k)) * np.where(rng.random(k) < 0.1, 8.0, 1.0)
    curve = linear_curve("w", rows, weight)
    for sparsity in (0.3, 0.5, 0.8):
        best = curve.split(sparsity)
        budget = 1 - sparsity
        fraction = KEPT_FRACTIONS[np.argmin(np.abs(KEPT_FRACTIONS - best.sparse_ratio * budget))]
        fixed = choose_split(rows, weight, sparsity, float(fraction / budget))  # the same split, evaluated directly
        assert best.rank == fixed.rank and best.threshold == pytest.approx(fixed.threshold)
        assert best.error == pytest.approx(fixed.error, rel=1e-6, abs=1e-12)
        # the best of every kept fraction on the grid that fits the budget
        for fraction in KEPT_FRACTIONS[KEPT_FRACTIONS <= budget]:
            other = choose_split(rows, weight, sparsity, float(fraction / budget))
            assert best.error <= other.error + 1e-9
        np.testing.assert_allclose(best.lowrank_in @ best.lowrank_out, fixed.lowrank_in @ fixed.lowrank_out, atol=1e-9)


# ------------------------------------------------------------------ the rewritten model

def test_allocated_model_passes_the_checker_and_onnxruntime_equals_numpy():
    model, samples = _chain_model_and_samples()
    after, report = _rsparse(model, samples, scope="linears", sparsity=0.6, allocation="greedy")
    check_model(after, "rsparse")
    t = {name: v.const_value.numpy() for name, v in after.graph.initializers.items()}

    def linear(x, name, weight):
        threshold, scale = t[f"{name}.rsparse_threshold"], t[f"{name}.rsparse_scale"]
        keep = np.abs(x) * scale > threshold
        x64 = x.astype(np.float64)
        if f"{name}.rsparse_lowrank_in" not in t:  # rank 0: a weighted threshold only
            return np.where(keep, x64, 0) @ t[weight]
        return np.where(keep, x64, 0) @ t[weight] + (np.where(keep, 0, x64) @ t[f"{name}.rsparse_lowrank_in"]) @ t[
            f"{name}.rsparse_lowrank_out"]

    ops = {n.op_type for n in after.graph if n.domain == DOMAIN}
    assert ops <= {RANK_SPARSE_MATMUL, SPARSIFY_WEIGHTED} and RANK_SPARSE_MATMUL in ops
    x = _chain_model_and_samples()[1][0]["x"] * 1.1  # not a calibration sample
    h = linear(x, "flat_linear", "flat").astype(np.float32)
    np.testing.assert_allclose(run_onnxruntime(after, {"x": x})[0], linear(h, "low_rank_linear", "low_rank"),
                               rtol=1e-4, atol=1e-4)


def test_allocation_needs_the_searched_split():
    with pytest.raises(ActsparseError, match="needs sparse_ratio=none and basis=weight"):
        make_pass("rsparse", {"allocation": "greedy", "sparse_ratio": 0.5})
    with pytest.raises(ActsparseError, match="needs sparse_ratio=none and basis=weight"):
        make_pass("rsparse", {"allocation": "evolutionary", "basis": "activation"})
