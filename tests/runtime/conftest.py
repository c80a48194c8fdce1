"""A small compiled model, built once per session, and helpers to write/alter artifacts of it.

The model: y = relu(x @ w + b), z = y * scale, with inputs (x, scale) and params (w, b).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from actsparse.runtime import artifact

N, K, M = 2, 8, 4
INPUTS = [
    {"name": "x", "shape": [N, K], "dtype": "float32"},
    {"name": "scale", "shape": [M], "dtype": "float32"},
]
OUTPUTS = [
    {"name": "y", "shape": [N, M], "dtype": "float32"},
    {"name": "z", "shape": [N, M], "dtype": "float32"},
]


def reference(x: np.ndarray, scale: np.ndarray, params: dict) -> dict[str, np.ndarray]:
    y = np.maximum(x @ params["w"] + params["b"], 0)
    return {"y": y, "z": y * scale}


@pytest.fixture(scope="session")
def executable():
    """The Relax executable of the model, compiled for this machine with a plain llvm target."""
    import tvm
    from tvm.script import ir as I
    from tvm.script import relax as R

    @I.ir_module
    class Module:
        @R.function
        def main(
            x: R.Tensor((2, 8), "float32"),
            scale: R.Tensor((4,), "float32"),
            w: R.Tensor((8, 4), "float32"),
            b: R.Tensor((4,), "float32"),
        ):
            with R.dataflow():
                y = R.nn.relu(R.add(R.matmul(x, w), b))
                z = R.multiply(y, scale)
                out = (y, z)
                R.output(out)
            return out

    return tvm.compile(Module, tvm.target.Target({"kind": "llvm"}))


@pytest.fixture(scope="session")
def params() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {"w": rng.standard_normal((K, M)).astype(np.float32), "b": rng.standard_normal(M).astype(np.float32)}


@pytest.fixture(scope="session")
def write(executable, params):
    """write(path, **options) -> Path: the session's model written as an artifact."""
    from actsparse.codegen.package import write_artifact

    def _write(path, **options):
        kwargs = dict(
            params=params,
            inputs=INPUTS,
            outputs=OUTPUTS,
            target={"kind": "llvm"},
            passes=[{"name": "relufy", "options": {}}],
            report={"note": "test"},
        )
        kwargs.update(options)
        return write_artifact(path, executable, **kwargs)

    return _write


@pytest.fixture(scope="session")
def artifact_dir(write, tmp_path_factory) -> Path:
    """A directory artifact shared by tests that only read it."""
    return write(tmp_path_factory.mktemp("artifact") / "model")


@pytest.fixture(scope="session")
def artifact_tar(write, tmp_path_factory) -> Path:
    return write(tmp_path_factory.mktemp("artifact") / "model.tar")


@pytest.fixture()
def artifact_copy(artifact_dir, tmp_path) -> Path:
    """A private copy of the directory artifact that a test may alter."""
    return Path(shutil.copytree(artifact_dir, tmp_path / "copy"))


def rewrite_manifest(root: Path, change) -> None:
    """Apply change(manifest) and re-hash the files, so only the changed field differs."""
    path = root / artifact.MANIFEST_NAME
    manifest = json.loads(path.read_text())
    change(manifest)
    manifest["files"] = artifact.hash_files(root)
    path.write_text(json.dumps(manifest))


@pytest.fixture(scope="session")
def inputs() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(11)
    return {"x": rng.standard_normal((N, K)).astype(np.float32), "scale": rng.standard_normal(M).astype(np.float32)}
