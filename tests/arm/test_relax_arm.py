"""A Relax model compiled for rpi4, packed with the aarch64 libtvm_runtime.so bundled, loaded
and run on the emulated board by the thin runtime (no tvm, torch or onnx there), matching
the host-compiled model. One board run serves all checks (Python start-up under qemu costs
seconds)."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("tvm")

from actsparse.errors import ActsparseError  # noqa: E402
from actsparse.runtime import artifact, load  # noqa: E402
from tests.arm.conftest import BOARD_SCRIPTS, model_inputs  # noqa: E402

pytestmark = pytest.mark.slow

RUNNER = BOARD_SCRIPTS / "run_artifact.py"
CASES = ("directory", "tar", "host")


@pytest.fixture(scope="module")
def board_runs(run_on_arm, rpi4_artifact, host_artifact, tmp_path_factory) -> dict:
    """{case: (outputs or None, JSON line)} for the rpi4 artifact as a directory and as a .tar,
    and the host (x86_64) artifact, run on the board without ACTSPARSE_TVM_RUNTIME: the
    artifacts' bundled runtime is the only TVM runtime there."""
    work = tmp_path_factory.mktemp("relax-arm")
    tar_path = work / "model.tar"
    artifact.write_tar(rpi4_artifact, tar_path)
    np.savez(work / "inputs.npz", **model_inputs())
    paths = {"directory": rpi4_artifact, "tar": tar_path, "host": host_artifact}
    args = [work / "inputs.npz"]
    for case in CASES:
        args += [paths[case], work / f"{case}-outputs.npz"]
    result = run_on_arm(RUNNER, *args, env={"ACTSPARSE_TVM_RUNTIME": ""})
    lines = [json.loads(line) for line in result.stdout.strip().splitlines()]
    runs = {}
    for case, info in zip(CASES, lines):
        outputs = None
        if "error" not in info:
            with np.load(work / f"{case}-outputs.npz", allow_pickle=False) as data:
                outputs = {name: data[name] for name in data.files}
        runs[case] = (outputs, info)
    runs["modules"] = lines[-1]["modules"]
    return runs


def test_rpi4_artifact_is_for_aarch64_with_bundled_runtime(rpi4_artifact):
    manifest = artifact.read_manifest(rpi4_artifact)
    assert manifest["target"]["machine"] == "aarch64"
    assert manifest["target"]["mcpu"] == "cortex-a72"
    assert manifest["runtime_library"] == "lib/libtvm_runtime.so"
    for name in ("model.so", "lib/libtvm_runtime.so"):
        header = (rpi4_artifact / name).read_bytes()[:20]
        assert int.from_bytes(header[18:20], "little") == 183, f"{name} is not an aarch64 ELF"


@pytest.mark.parametrize("case", ["directory", "tar"])
def test_rpi4_artifact_runs_on_board_like_host(board_runs, host_reference, case):
    outputs, info = board_runs[case]
    assert outputs is not None, info
    np.testing.assert_allclose(outputs["y"], host_reference["y"], atol=1e-4, rtol=1e-4)


def test_board_runtime_imports_no_compiler(board_runs):
    assert board_runs["modules"] == []


def test_board_refuses_host_artifact(board_runs):
    outputs, info = board_runs["host"]
    assert outputs is None
    assert "compiled for x86_64" in info["error"] and "this machine is aarch64" in info["error"]


def test_host_refuses_rpi4_artifact(rpi4_artifact):
    with pytest.raises(ActsparseError, match="compiled for aarch64"):
        load(rpi4_artifact)
