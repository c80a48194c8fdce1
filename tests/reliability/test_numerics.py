"""Numerical guard rails: NaN/Inf in inputs and calibration data, and calibration data that
would make a threshold or scale divide by zero (all-zero channels, constant activations,
zero weight rows for WINA, no tokens at all).

Choices (docs/safety.md): calibration data with NaN/Inf is refused; at run time NaN/Inf in
inputs propagate as IEEE arithmetic says (no check on the hot path), and a run never fails
or changes later runs because of them.
"""

from __future__ import annotations

import io
import json
from contextlib import redirect_stderr, redirect_stdout

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from actsparse import cli
from actsparse.frontend import zoo
from actsparse.api import optimize
from actsparse.errors import ActsparseError
from actsparse.passes.measure import measure_sparsity
from actsparse.runtime import load
from tests import onnx_models
from tests.onnx_models import run_ort
from tests.runtime.conftest import K, M, N, reference


def _cli(argv) -> tuple[int, str]:
    err = io.StringIO()
    with redirect_stderr(err), redirect_stdout(io.StringIO()):
        status = cli.main([str(a) for a in argv])
    return status, err.getvalue()


# ---------------------------------------------------------------- NaN / Inf

@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_calibration_with_nan_or_inf_is_refused(tmp_path, bad):
    onnx.save(zoo.swiglu_stack(layers=1, d=8, f=16), tmp_path / "m.onnx")
    x = np.ones((4, 1, 8), np.float32)
    x[2, 0, 3] = bad
    np.savez(tmp_path / "calib.npz", x=x)
    status, stderr = _cli(["optimize", tmp_path / "m.onnx", "-o", tmp_path / "o.onnx", "--calib",
                           tmp_path / "calib.npz", "--passes", "sparsify{sparsity=0.5}"])
    assert status == 2
    assert stderr.strip().splitlines() == [f"actsparse: error: {tmp_path / 'calib.npz'}: input 'x' contains NaN or Inf"]
    assert not (tmp_path / "o.onnx").exists()


def test_nan_inputs_are_refused_at_run_time_and_do_not_stick(artifact_dir, params):
    model = load(artifact_dir)
    rng = np.random.default_rng(0)
    x, scale = rng.standard_normal((N, K)).astype(np.float32), rng.standard_normal(M).astype(np.float32)
    poisoned = x.copy()
    poisoned[0, 0] = np.nan
    with pytest.raises(ActsparseError, match=r"input 'x' contains NaN"):
        model.run(poisoned, scale)
    clean = model.run(x, scale)
    for name, value in reference(x, scale, params).items():
        np.testing.assert_allclose(clean[name], value, rtol=1e-5, atol=1e-6)


def test_inf_inputs_follow_ieee_arithmetic(artifact_dir, params):
    """+-Inf is legitimate input (additive attention masks): it runs and propagates."""
    model = load(artifact_dir)
    x, scale = np.ones((N, K), np.float32), np.ones(M, np.float32)
    scale[1] = np.inf
    out = model.run(x, scale)
    want = reference(x, scale, params)
    with np.errstate(invalid="ignore"):
        np.testing.assert_array_equal(out["z"], want["z"])


def test_run_cli_with_nan_inputs_is_one_clear_line(artifact_tar, tmp_path):
    np.savez(tmp_path / "in.npz", x=np.full((N, K), np.nan, np.float32), scale=np.ones(M, np.float32))
    status, stderr = _cli(["run", artifact_tar, "--inputs", tmp_path / "in.npz", "-o", tmp_path / "out.npz"])
    assert (status, stderr) == (2, "actsparse: error: input 'x' contains NaN\n")
    assert not (tmp_path / "out.npz").exists()


# ---------------------------------------------------------------- degenerate calibration data

def _swiglu(zero_rows: bool = False, zero_all: bool = False) -> onnx.ModelProto:
    """The tiny SwiGLU stack, optionally with zero rows in its down weight (WINA's scale 0)."""
    proto = zoo.swiglu_stack(layers=1, d=8, f=16)
    for tensor in proto.graph.initializer:
        array = numpy_helper.to_array(tensor).copy()
        if zero_all or (zero_rows and "down_proj" in tensor.name):
            array[: (array.shape[0] if zero_all else array.shape[0] // 2)] = 0
        tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))
    return proto


def _assert_finite_model(result, feeds):
    proto = result.to_onnx()
    for tensor in proto.graph.initializer:
        array = numpy_helper.to_array(tensor)
        if array.dtype.kind == "f":
            assert np.isfinite(array).all(), f"{tensor.name} holds NaN/Inf"
    outputs = run_ort(proto, feeds)
    assert all(np.isfinite(o).all() for o in outputs)
    json.dumps(result.report(), allow_nan=False)  # reports are plain JSON: no NaN from 0/0


CALIBRATIONS = {
    "all_zero": lambda: [{"x": np.zeros((1, 8), np.float32)} for _ in range(4)],
    "constant": lambda: [{"x": np.full((1, 8), 0.25, np.float32)} for _ in range(4)],
    "zero_channels": lambda: [{"x": np.where(np.arange(8) % 2, np.float32(i + 1), np.float32(0))[None]
                               .astype(np.float32)} for i in range(4)],
}


@pytest.mark.parametrize("data", sorted(CALIBRATIONS))
@pytest.mark.parametrize("pipeline", ["sparsify{method=teal,sparsity=0.5}", "sparsify{method=wina,sparsity=0.5}",
                                      "sparsify{method=cats,sparsity=0.5}",
                                      "sparsify{sparsity=0.5,allocate=greedy}", "measure"])
def test_degenerate_calibration_gives_finite_thresholds(data, pipeline):
    calibration = CALIBRATIONS[data]()
    result = optimize(_swiglu(), passes=pipeline, calib=calibration)
    _assert_finite_model(result, calibration[0])


@pytest.mark.parametrize("weights", ["zero_rows", "zero_all"])
@pytest.mark.parametrize("allocate", ["uniform", "greedy"])
def test_wina_with_zero_weight_rows_never_divides_by_zero(weights, allocate):
    calibration = [{"x": np.random.default_rng(i).standard_normal((1, 8)).astype(np.float32)} for i in range(4)]
    model = _swiglu(zero_rows=weights == "zero_rows", zero_all=weights == "zero_all")
    with np.errstate(divide="raise", invalid="raise"):  # any 0/0 or x/0 in numpy fails the test
        result = optimize(model, passes=f"sparsify{{method=wina,sparsity=0.5,allocate={allocate}}}",
                          calib=calibration)
    _assert_finite_model(result, calibration[0])


def test_calibration_samples_without_values_are_refused(tmp_path):
    """A dynamic-batch model calibrated on empty batches: statistics would be 0/0."""
    onnx.save(onnx_models.mlp_with_foldable_constants(dynamic_batch=True), tmp_path / "m.onnx")
    np.savez(tmp_path / "calib.npz", x=np.zeros((3, 0, 8), np.float32))
    for passes in ("measure", "sparsify{sparsity=0.5}"):
        status, stderr = _cli(["optimize", tmp_path / "m.onnx", "-o", tmp_path / "o.onnx", "--calib",
                               tmp_path / "calib.npz", "--passes", passes])
        assert (status, stderr.strip()) == (2, f"actsparse: error: {tmp_path / 'calib.npz'}: input 'x' samples are "
                                               f"empty (shape (0, 8))")


def test_measure_sparsity_of_all_zero_activations_is_one():
    from actsparse.api import to_ir_model

    report = measure_sparsity(to_ir_model(_swiglu(zero_all=True)), [{"x": np.zeros((1, 8), np.float32)}])
    assert report["linears"] == 3
    assert all(np.isfinite(layer["sparsity"]) for layer in report["layers"])
    json.dumps(report, allow_nan=False)
