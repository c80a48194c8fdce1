"""actsparse.compile(..., target="rpi4") end to end: the artifact compiled on x86 runs on the
emulated board (qemu-aarch64) and matches the host-compiled artifact to 1e-4."""

from __future__ import annotations

import json

import numpy as np
import pytest

import actsparse
from actsparse.frontend.zoo import swiglu_stack
from tests.arm.conftest import BOARD_SCRIPTS

pytestmark = pytest.mark.slow


def _feeds(model_path) -> dict[str, np.ndarray]:
    from actsparse.calibrate.data import generate_calibration
    from actsparse.frontend.onnx_file import load_model

    return generate_calibration(load_model(model_path), 1, seed=3)[0]


@pytest.fixture(scope="module")
def ffn_path(tmp_path_factory):
    import onnx

    path = tmp_path_factory.mktemp("ffn") / "ffn.onnx"
    onnx.save(swiglu_stack(layers=2, d=96, f=256), path)
    return path


CASES = {
    "ffn dense": ("ffn_path", None),
    "ffn TEAL 50%": ("ffn_path", "sparsify{method=teal,sparsity=0.5,scope=ffn}"),
    "ffn relufy": ("ffn_path", "relufy"),
    "tiny llama": ("llama_onnx", None),
    "tiny llama TEAL 50%": ("llama_onnx", "sparsify{method=teal,sparsity=0.5}"),
    "all-MiniLM-L6-v2": ("minilm_onnx", None),
}


@pytest.fixture(scope="module")
def board_results(request, arm_userland, run_on_arm, tmp_path_factory):
    """Compile every case for rpi4 and the host, run all rpi4 artifacts in one qemu session."""
    work = tmp_path_factory.mktemp("rpi4-compile")
    runtime = arm_userland / "lib" / "libtvm_runtime.so"
    cases = {}
    for name, (fixture, passes) in CASES.items():
        model_path = request.getfixturevalue(fixture)
        feeds = _feeds(model_path)
        slug = name.replace(" ", "_").replace("%", "")
        optimized = actsparse.optimize(str(model_path), passes=passes).model if passes else str(model_path)
        shapes = {k: v for k, v in feeds.items()}
        arm = actsparse.compile(optimized, target="rpi4", example_inputs=shapes, output=work / f"{slug}.rpi4.actsparse",
                                bundle_runtime=str(runtime))
        host = actsparse.compile(optimized, target="host", example_inputs=shapes, output=work / f"{slug}.host.actsparse")
        np.savez(work / f"{slug}.in.npz", **feeds)
        cases[name] = (arm, host.run(feeds), work / f"{slug}.in.npz", work / f"{slug}.out.npz")
    results = {}
    for name, (arm, expected, inputs, outputs) in cases.items():
        run = run_on_arm(BOARD_SCRIPTS / "run_artifact.py", inputs, arm.path, outputs, timeout=900)
        lines = [json.loads(line) for line in run.stdout.strip().splitlines()]
        with np.load(outputs) as data:
            results[name] = (lines, expected, {k: data[k] for k in data.files}, arm)
    return results


@pytest.mark.parametrize("case", list(CASES))
def test_rpi4_artifact_matches_host(board_results, case):
    lines, expected, actual, artifact = board_results[case]
    assert "error" not in lines[0], lines[0]
    assert lines[-1]["modules"] == [], "the board imported heavy packages"
    manifest = json.loads((artifact.path / "manifest.json").read_text())
    assert manifest["target"]["machine"] == "aarch64" and manifest["runtime_library"]
    for name, value in expected.items():
        np.testing.assert_allclose(actual[name], value, rtol=1e-4, atol=1e-4)
