"""Fixtures for the reliability tests, and the session summary of fuzz case counts."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest

from actsparse.frontend import zoo
from tests import onnx_models
from tests.reliability.harness import COUNTS, FUZZ_ENV, CaseFolders
# The small compiled Relax model of the runtime tests (no dependence on the ONNX lowering).
from tests.runtime.conftest import executable, inputs, params, write  # noqa: F401


def pytest_terminal_summary(terminalreporter):
    if not COUNTS:
        return
    terminalreporter.section("reliability fuzz cases")
    for category, count in sorted(COUNTS.items()):
        terminalreporter.write_line(f"{category:<28} {count:>7}")
    terminalreporter.write_line(f"{'total':<28} {sum(COUNTS.values()):>7}"
                                f"   (set {FUZZ_ENV}=N for N cases per fuzz test)")


@pytest.fixture(scope="session")
def tiny_models() -> dict[str, onnx.ModelProto]:
    """Small valid models the mutations start from (each runs in a few milliseconds)."""
    return {
        "swiglu": zoo.swiglu_stack(layers=1, d=8, f=16),
        "gelu_mlp": zoo.gelu_mlp_stack(layers=1, d=8, f=16),
        "foldable": onnx_models.mlp_with_foldable_constants(),
        "if": onnx_models.if_model(),
    }


@pytest.fixture()
def cases(tmp_path) -> CaseFolders:
    return CaseFolders(tmp_path)


@pytest.fixture(scope="session")
def artifact_tar(write, tmp_path_factory) -> Path:
    """The runtime tests' model as a .tar artifact (inputs x [2, 8], scale [4])."""
    return write(tmp_path_factory.mktemp("artifact") / "model.tar")


@pytest.fixture(scope="session")
def artifact_dir(write, tmp_path_factory) -> Path:
    return write(tmp_path_factory.mktemp("artifact") / "model")
