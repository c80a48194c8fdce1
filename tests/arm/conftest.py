"""Fixtures for the ARM (Raspberry Pi 4) tests: an arm64 board emulated with qemu-aarch64.

The board is the userland of scripts/arm/build_userland.sh (default .cache/arm64-userland,
or $ACTSPARSE_ARM_USERLAND), built here on first use when the toolchain is installed
(scripts/arm/setup_toolchain.sh). Without an x86_64 host or the toolchain the tests are
skipped with the reason; under CI (CI=true) they fail instead, so a broken set-up cannot
pass silently.

    run_on_arm("import numpy; print(numpy.__version__)")     # code, or a .py path + args
    run_on_arm(BOARD_SCRIPTS / "run_kernels.py", spec_path)

The guest's PYTHONPATH holds only the device package (actsparse's runtime and RPC server,
no compiler), tests/arm/board and the aarch64 wheels: no torch, onnx or tvm.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BOARD_SCRIPTS = Path(__file__).resolve().parent / "board"
USERLAND = Path(os.environ.get("ACTSPARSE_ARM_USERLAND", REPO / ".cache" / "arm64-userland"))
REQUIRED_TOOLS = ("aarch64-linux-gnu-g++", "qemu-aarch64-static", "debootstrap")


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _unavailable(reason: str):
    if _in_ci():
        pytest.fail(f"ARM tests cannot run in CI: {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def arm_userland() -> Path:
    """The arm64 userland folder, built on first use (about a minute, needs network and root).

    The build script runs every session: when its stamps match it returns at once, and a
    changed recipe (e.g. new wheel versions) rebuilds what changed."""
    if platform.machine() != "x86_64":
        _unavailable(f"the emulated ARM board needs an x86_64 host (this is {platform.machine()})")
    missing = [tool for tool in REQUIRED_TOOLS if shutil.which(tool) is None]
    if missing:
        _unavailable(f"{', '.join(missing)} not installed: run scripts/arm/setup_toolchain.sh")
    build = subprocess.run(
        ["bash", str(REPO / "scripts" / "arm" / "build_userland.sh"), str(USERLAND)],
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if build.returncode != 0:
        tail = "\n".join((build.stderr or build.stdout).strip().splitlines()[-10:])
        _unavailable(f"building the arm64 userland failed (scripts/arm/build_userland.sh):\n{tail}")
    return USERLAND


@pytest.fixture(scope="session")
def arm_board(arm_userland):
    from actsparse.deploy.qemu import EmulatedBoard

    return EmulatedBoard.from_userland(arm_userland)


@pytest.fixture(scope="session")
def arm_device_package(tmp_path_factory) -> Path:
    """The device-side actsparse modules, staged for the guest's PYTHONPATH."""
    from actsparse.deploy.device import stage_device_package

    return stage_device_package(tmp_path_factory.mktemp("device-package"))


@pytest.fixture(scope="session")
def run_on_arm(arm_board, arm_device_package):
    """run_on_arm(code_or_script, *args, env=None, timeout=600, qemu_args=()) -> CompletedProcess.

    A string that is not the path of a .py file runs as ``python -c``. A non-zero exit
    raises ActsparseError with the tail of stderr.
    """

    def run(code_or_script, *args, env=None, timeout=600, qemu_args=()):
        script = Path(code_or_script) if str(code_or_script).endswith(".py") else None
        head = [str(script)] if script is not None and script.is_file() else ["-c", str(code_or_script)]
        return arm_board.run_python(
            [*head, *map(str, args)],
            pythonpath=[arm_device_package, BOARD_SCRIPTS],
            env=env,
            timeout=timeout,
            qemu_args=qemu_args,
        )

    return run


@pytest.fixture(scope="session")
def rpi4_target():
    from actsparse.codegen.targets import resolve_target

    return resolve_target("rpi4")


def export_arm_library(functions: dict, target, path: Path) -> Path:
    """Compile TIR PrimFuncs {symbol: func} into one aarch64 shared library at `path`."""
    import tvm

    from actsparse.codegen.cross import cross_fcompile

    module = tvm.IRModule({name: func.with_attr("global_symbol", name) for name, func in functions.items()})
    tvm.compile(module, target).export_library(str(path), fcompile=cross_fcompile("aarch64"))
    return path


# ---------------------------------------------------------------- a small Relax model

MODEL_INPUTS = [{"name": "x", "shape": [2, 64], "dtype": "float32"}]
MODEL_OUTPUTS = [{"name": "y", "shape": [2, 48], "dtype": "float32"}]


def model_params() -> dict:
    import numpy as np

    rng = np.random.default_rng(3)
    return {"w": rng.standard_normal((64, 48)).astype(np.float32), "b": rng.standard_normal(48).astype(np.float32)}


def model_inputs() -> dict:
    import numpy as np

    return {"x": np.random.default_rng(4).standard_normal((2, 64)).astype(np.float32)}


def relax_model():
    """y = relu(x @ w + b), with w and b as parameters, built with the BlockBuilder."""
    from tvm import relax

    builder = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, 64), "float32"))
    w = relax.Var("w", relax.TensorType((64, 48), "float32"))
    b = relax.Var("b", relax.TensorType((48,), "float32"))
    with builder.function("main", [x, w, b]):
        with builder.dataflow():
            y = builder.emit(relax.op.nn.relu(relax.op.add(relax.op.matmul(x, w), b)))
            out = builder.emit_output(y)
        builder.emit_func_output(out)
    return builder.get()


def write_model_artifact(path: Path, target_name: str, bundle_runtime=False, params=None) -> Path:
    """The Relax model compiled for `target_name` ("rpi4", "host", ...) and written as an artifact
    (with `model_params()` unless other `params` are given)."""
    import tvm

    from actsparse.codegen.package import write_artifact
    from actsparse.codegen.targets import resolve_target, target_summary

    target = resolve_target(target_name)
    executable = tvm.compile(relax_model(), target)
    return write_artifact(
        path,
        executable,
        params=params or model_params(),
        inputs=MODEL_INPUTS,
        outputs=MODEL_OUTPUTS,
        target=target_summary(target),
        passes=[],
        report={"note": "tests/arm"},
        bundle_runtime=bundle_runtime,
    )


@pytest.fixture(scope="session")
def host_reference() -> dict:
    """The model's outputs from the host-compiled (x86) executable run with tvm's own VM."""
    import numpy as np
    import tvm
    from tvm import relax

    from actsparse.codegen.targets import resolve_target

    executable = tvm.compile(relax_model(), resolve_target("host"))
    vm = relax.VirtualMachine(executable, tvm.cpu())
    args = [tvm.runtime.tensor(a) for a in (*model_inputs().values(), *model_params().values())]
    return {"y": np.asarray(vm["main"](*args).numpy())}


@pytest.fixture(scope="session")
def rpi4_artifact(arm_userland, tmp_path_factory) -> Path:
    """The model for rpi4 as a directory artifact with the aarch64 libtvm_runtime.so bundled."""
    return write_model_artifact(
        tmp_path_factory.mktemp("rpi4-artifact") / "model",
        "rpi4",
        bundle_runtime=arm_userland / "lib" / "libtvm_runtime.so",
    )


@pytest.fixture(scope="session")
def host_artifact(tmp_path_factory) -> Path:
    """The model for this (x86_64) machine: the wrong architecture for the board."""
    return write_model_artifact(tmp_path_factory.mktemp("host-artifact") / "model", "host")
