"""The device side as a user installs it: `pip install actsparse` (no extras) in a clean venv.

The base install is the runtime (numpy, apache-tvm-ffi, safetensors, cryptography); the
compiler's dependencies are the `compile` extra. One venv per module, without system site
packages, holds only that install; an artifact compiled here (with the TVM runtime bundled,
since the venv has no apache-tvm) must run there with the same outputs, through the API, the
`actsparse` command and `python -m actsparse.runtime`, while onnx, onnxruntime, torch and the
TVM compiler cannot be imported. The staged device package (actsparse/deploy/device.py) must
run in the same venv on its own.

Needs a package index (or pip's cache) for the runtime's wheels: skipped, with the reason,
where pip cannot reach one. The install takes ~7 s with a warm pip cache.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
# Every module the compile extra brings; none may be importable on the device.
COMPILER_MODULES = ("onnx", "onnxruntime", "onnxscript", "onnx_ir", "torch", "tvm")
INSTALL_TIMEOUT_S = 600


def _device_env() -> dict[str, str]:
    """This environment without anything that would put the checkout or the test venv on the path."""
    drop = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "ACTSPARSE_TVM_RUNTIME", "PYTHONSTARTUP")
    return {k: v for k, v in os.environ.items() if k not in drop} | {"PIP_DISABLE_PIP_VERSION_CHECK": "1"}


def _pip(venv_python: Path, *args: str) -> subprocess.CompletedProcess:
    # The test interpreter's pip installs into the venv (`--python`, pip >= 22.3): the venv itself
    # starts empty, and the install shares this pip's configuration and cache.
    return subprocess.run([sys.executable, "-m", "pip", "--python", str(venv_python), *args], capture_output=True,
                          text=True, env=_device_env(), timeout=INSTALL_TIMEOUT_S)


def _skip_unless_an_index_answers(venv_python: Path, failed: subprocess.CompletedProcess, scratch: Path) -> None:
    """The install failed: skip if pip cannot fetch even numpy (no index, no cache), else fail."""
    if "no such option: --python" in failed.stderr:
        pytest.skip("the device install needs pip >= 22.3 (pip install --upgrade pip; `make setup` does)")
    probe = _pip(venv_python, "download", "--no-deps", "--dest", str(scratch / "probe"), "numpy")
    if probe.returncode != 0:
        errors = [line for line in probe.stderr.splitlines() if line.startswith("ERROR")] or [probe.stderr.strip()[-300:]]
        pytest.skip(f"pip cannot reach a package index for the device install: {errors[0]}")
    pytest.fail(f"pip install of the device side failed:\n{failed.stdout[-2000:]}\n{failed.stderr[-4000:]}")


def _source_copy(dest: Path) -> Path:
    """What the build needs, copied: pip's build leaves build/ and *.egg-info beside the sources."""
    dest.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md"):
        shutil.copyfile(REPO / name, dest / name)
    shutil.copytree(REPO / "actsparse", dest / "actsparse", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


@pytest.fixture(scope="module")
def device(tmp_path_factory) -> dict[str, Path]:
    """{"python": the venv's interpreter, "bin": its scripts folder, "work": a folder outside the checkout}."""
    root = tmp_path_factory.mktemp("device")
    venv = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    python = venv / "bin" / "python"
    installed = _pip(python, "install", "--no-input", str(_source_copy(root / "src")))
    if installed.returncode != 0:
        _skip_unless_an_index_answers(python, installed, root)
    work = root / "work"
    work.mkdir()
    return {"python": python, "bin": venv / "bin", "work": work}


def _run(device, *command: str, pythonpath: Path | None = None) -> subprocess.CompletedProcess:
    """Run in the device venv from a folder outside the checkout (so the checkout is not importable)."""
    env = _device_env() | ({"PYTHONPATH": str(pythonpath)} if pythonpath else {})
    return subprocess.run(list(command), capture_output=True, text=True, cwd=device["work"], env=env, timeout=300)


@pytest.fixture(scope="module")
def bundled(write, tmp_path_factory) -> Path:
    """The runtime conftest's model, with this machine's libtvm_runtime.so inside (the venv has no apache-tvm)."""
    return write(tmp_path_factory.mktemp("bundled") / "model", bundle_runtime=True)


@pytest.fixture(scope="module")
def feeds(inputs, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("feeds") / "inputs.npz"
    np.savez(path, **inputs)
    return path


@pytest.fixture(scope="module")
def expected(bundled, inputs) -> dict[str, np.ndarray]:
    """The outputs of the artifact run in this process (the compiler's environment)."""
    from actsparse.runtime import load

    return load(bundled).run(inputs)


def _assert_same_outputs(path: Path, expected: dict[str, np.ndarray]) -> None:
    with np.load(path) as got:
        assert sorted(got.files) == sorted(expected)
        for name, value in expected.items():
            np.testing.assert_array_equal(got[name], value)


_RUN_THROUGH_THE_API = r"""
import json, sys
import numpy as np
import actsparse
model = actsparse.load(sys.argv[1])
with np.load(sys.argv[2]) as feeds:
    outputs = model.run(dict(feeds))
np.savez(sys.argv[3], **outputs)
print(json.dumps({
    "actsparse": actsparse.__file__,
    "imported": sorted(m for m in COMPILER_MODULES if m in sys.modules),
}))
""".replace("COMPILER_MODULES", repr(COMPILER_MODULES))


def test_the_compiler_is_not_installed(device):
    for module in COMPILER_MODULES:
        done = _run(device, str(device["python"]), "-c", f"import {module}")
        assert done.returncode != 0, f"import {module} works in the device venv"
        assert "ModuleNotFoundError" in done.stderr, done.stderr


def test_an_artifact_runs_with_the_outputs_of_the_compiling_process(device, bundled, feeds, expected):
    out = device["work"] / "api.npz"
    done = _run(device, str(device["python"]), "-c", _RUN_THROUGH_THE_API, str(bundled), str(feeds), str(out))
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert "site-packages" in report["actsparse"]  # the installed package, not the checkout
    assert report["imported"] == []
    _assert_same_outputs(out, expected)


def test_the_commands_run_an_artifact(device, bundled, feeds, expected):
    for name, command in (("cli", [str(device["bin"] / "actsparse")]),
                          ("module", [str(device["python"]), "-m", "actsparse.runtime"])):
        out = device["work"] / f"{name}.npz"
        done = _run(device, *command, "run", str(bundled), "--inputs", str(feeds), "-o", str(out))
        assert done.returncode == 0, f"{name}: {done.stderr}"
        _assert_same_outputs(out, expected)


def test_bench_times_an_artifact_on_the_device(device, bundled):
    done = _run(device, str(device["bin"] / "actsparse"), "bench", str(bundled), "--against", "none")
    assert done.returncode == 0, done.stderr
    assert "actsparse" in done.stdout


def test_compiler_commands_name_the_extra_to_install(device, tmp_path):
    """One line and exit status 2, not an internal error, for each command that needs the compiler."""
    model = tmp_path / "model.onnx"
    model.write_bytes(b"not read: the compiler is missing first")
    cli = str(device["bin"] / "actsparse")
    for command in (["optimize", str(model), "-o", str(tmp_path / "out.onnx")],
                    ["compile", str(model), "-o", str(tmp_path / "out.actsparse")], ["inspect", str(model)]):
        done = _run(device, cli, *command)
        assert done.returncode == 2, f"{command[0]}: {done.stderr}"
        assert 'pip install "actsparse[compile]"' in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr


def test_a_signed_artifact_runs_under_trust(device, bundled, feeds, expected, tmp_path):
    """cryptography is a base dependency: keygen, sign and --trust work on the device side."""
    signed = Path(shutil.copytree(bundled, tmp_path / "signed"))
    cli = str(device["bin"] / "actsparse")
    for step in (["keygen", "-o", str(tmp_path / "release")], ["sign", str(signed), "--key", str(tmp_path / "release.key")]):
        done = _run(device, cli, *step)
        assert done.returncode == 0, f"{step[0]}: {done.stderr}"
    out = tmp_path / "signed.npz"
    done = _run(device, cli, "run", str(signed), "--inputs", str(feeds), "-o", str(out),
                "--trust", str(tmp_path / "release.pub"))
    assert done.returncode == 0, done.stderr
    _assert_same_outputs(out, expected)


def test_the_compiler_api_names_the_extra_to_install(device):
    done = _run(device, str(device["python"]), "-c", "import actsparse; actsparse.compile")
    assert done.returncode != 0
    assert "ActsparseError" in done.stderr and 'pip install "actsparse[compile]"' in done.stderr, done.stderr


_IMPORT_EVERY_MODULE = r"""
import importlib, json, pkgutil, sys
import actsparse
names = ["actsparse"]
for info in pkgutil.walk_packages(actsparse.__path__, "actsparse."):
    importlib.import_module(info.name)
    names.append(info.name)
print(json.dumps({"actsparse": actsparse.__file__, "modules": names,
                  "imported": sorted(m for m in COMPILER_MODULES if m in sys.modules)}))
""".replace("COMPILER_MODULES", repr(COMPILER_MODULES))


def test_the_staged_device_package_imports_and_runs(device, bundled, feeds, expected, tmp_path):
    """Every module `stage_device_package` copies imports with the base dependencies alone, and the
    staged package (first on the path, so the installed one is not consulted) runs the artifact."""
    from actsparse.deploy.device import stage_device_package

    staged = stage_device_package(tmp_path / "staged")
    done = _run(device, str(device["python"]), "-c", _IMPORT_EVERY_MODULE, pythonpath=staged)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["actsparse"] == str(staged / "actsparse" / "__init__.py")
    assert {"actsparse.runtime.model", "actsparse.deploy.server", "actsparse.deploy.rpc"} <= set(report["modules"])
    assert report["imported"] == []
    out = tmp_path / "staged.npz"
    done = _run(device, str(device["python"]), "-m", "actsparse.runtime", "run", str(bundled),
                "--inputs", str(feeds), "-o", str(out), pythonpath=staged)
    assert done.returncode == 0, done.stderr
    _assert_same_outputs(out, expected)
