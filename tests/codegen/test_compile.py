"""The compile path end to end, through the API and the CLI, on hand-built FFN stacks
(no transformers model): every compiled artifact matches onnxruntime on the same optimized
ONNX to 1e-4; `actsparse run` works in a fresh process; a bad target fails with one line.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

pytest.importorskip("tvm")

import actsparse  # noqa: E402
from actsparse.frontend.zoo import gelu_mlp_stack, swiglu_stack  # noqa: E402

ATOL = 1e-4
ACTSPARSE = [sys.executable, "-m", "actsparse.cli"]

# name -> (model builder, passes or None, kernels the plan must hold)
CASES = {
    "swiglu_dense": (swiglu_stack, None, {"ffn_dense"}),
    "swiglu_teal": (swiglu_stack, "sparsify{method=teal,sparsity=0.5,scope=ffn}", {"ffn_input_sparse"}),
    "swiglu_wina": (swiglu_stack, "sparsify{method=wina,sparsity=0.5,scope=ffn}", {"scaled"}),
    "swiglu_relufy": (swiglu_stack, "relufy", {"ffn_gate_sparse"}),
    "gelu_mlp_dense": (gelu_mlp_stack, None, {"dense"}),
    "gelu_mlp_relufy": (gelu_mlp_stack, "relufy", {"dense", "nonzero"}),
}


def _x(seed: int, d: int = 64) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, d)).astype(np.float32)


CALIBRATION = [{"x": _x(100 + i)} for i in range(8)]


def _ort(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    return ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.fixture(scope="module", params=list(CASES))
def case(request, tmp_path_factory):
    """(name, artifact from actsparse.compile, the optimized ONNX onnxruntime runs)."""
    build, passes, _ = CASES[request.param]
    proto = build()
    output = tmp_path_factory.mktemp(request.param) / "model.actsparse"
    artifact = actsparse.compile(proto, target="host", passes=passes, example_inputs={"x": _x(0)},
                                 output=output, calib=CALIBRATION)
    reference = actsparse.optimize(proto, passes=passes, calib=CALIBRATION).to_onnx() if passes else proto
    return request.param, artifact, reference


def test_compiled_matches_onnxruntime(case):
    _, artifact, reference = case
    for seed in (1, 2, 3):
        x = _x(seed)
        np.testing.assert_allclose(artifact.run(x=x)["y"], _ort(reference, x), atol=ATOL, rtol=0)


def test_loaded_artifact_gives_the_same_outputs(case):
    _, artifact, _ = case
    x = _x(4)
    np.testing.assert_array_equal(actsparse.load(artifact.path).run(x=x)["y"], artifact.run(x=x)["y"])


def test_kernel_plan(case):
    name, artifact, _ = case
    assert {layer["kernel"] for layer in artifact.kernels} == CASES[name][2]
    assert artifact.path.exists() and (artifact.path / "manifest.json").is_file()


def test_cli_run_in_a_subprocess(case, tmp_path):
    _, artifact, reference = case
    x = _x(5)
    np.savez(tmp_path / "in.npz", x=x)
    done = subprocess.run([*ACTSPARSE, "run", str(artifact.path), "--inputs", str(tmp_path / "in.npz"),
                           "-o", str(tmp_path / "out.npz")], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    with np.load(tmp_path / "out.npz") as out:
        np.testing.assert_allclose(out["y"], _ort(reference, x), atol=ATOL, rtol=0)


@pytest.mark.slow  # the CLI imports TVM (~11 s) to resolve the target
def test_cli_bad_target_exits_2_with_one_line(tmp_path):
    model = tmp_path / "m.onnx"
    onnx.save_model(swiglu_stack(), str(model))
    output = tmp_path / "out.actsparse"
    done = subprocess.run([*ACTSPARSE, "compile", str(model), "-o", str(output), "--target", "no-such-board"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "no-such-board" in lines[0], done.stderr
    assert "Traceback" not in done.stderr
    assert not output.exists()


@pytest.mark.slow
def test_cli_compile_then_run_matches_onnxruntime(tmp_path):
    """`actsparse compile --passes relufy` then `actsparse run`, both as separate processes."""
    model, artifact = tmp_path / "m.onnx", tmp_path / "m.actsparse"
    onnx.save_model(swiglu_stack(), str(model))
    env = os.environ | {"NO_COLOR": "1"}
    done = subprocess.run([*ACTSPARSE, "compile", str(model), "-o", str(artifact), "--passes", "relufy"],
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr
    assert "ffn_gate_sparse x2" in done.stderr
    x = _x(6)
    np.savez(tmp_path / "in.npz", x=x)
    done = subprocess.run([*ACTSPARSE, "run", str(artifact), "--inputs", str(tmp_path / "in.npz"),
                           "-o", str(tmp_path / "out.npz")], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    reference = actsparse.optimize(str(model), passes="relufy").to_onnx()
    with np.load(tmp_path / "out.npz") as out:
        np.testing.assert_allclose(out["y"], _ort(reference, x), atol=ATOL, rtol=0)
    assert Path(artifact / "manifest.json").is_file()
