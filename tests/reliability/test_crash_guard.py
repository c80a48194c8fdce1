"""No input may kill `actsparse compile` without a word: a 10,000-input Sum (TVM's recursive
passes overflowed the stack: SIGSEGV, nothing on stderr) compiles, and any crash of the native
compiler becomes one line and exit status 2 (the console command compiles in a forked child)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import actsparse
from actsparse.command_guard import run_crash_guarded
from actsparse.errors import ActsparseError


def _wide_sum(n: int) -> onnx.ModelProto:
    inits = [numpy_helper.from_array(np.full((1, 8), i, np.float32), f"c{i}") for i in range(n)]
    node = helper.make_node("Sum", ["x"] + [f"c{i}" for i in range(n)], ["y"], name="wide_sum")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.slow
def test_a_sum_of_10000_inputs_compiles_and_is_right(tmp_path):
    path = tmp_path / "sum.onnx"
    onnx.save(_wide_sum(10_000), path)
    done = subprocess.run([sys.executable, "-m", "actsparse.cli", "compile", str(path), "-o", str(tmp_path / "s")],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr
    x = np.ones((1, 8), np.float32)
    y = actsparse.load(tmp_path / "s").run(x=x)["y"]
    np.testing.assert_allclose(y, x + sum(range(10_000)), rtol=1e-6)


def test_mean_and_max_trees_match_onnxruntime(tmp_path):
    import onnxruntime as ort

    inits = [numpy_helper.from_array(np.random.default_rng(i).standard_normal((1, 8)).astype(np.float32), f"c{i}")
             for i in range(21)]
    names = ["x"] + [f"c{i}" for i in range(21)]
    nodes = [helper.make_node("Mean", names, ["m"], name="mean"), helper.make_node("Max", names, ["mx"], name="max"),
             helper.make_node("Add", ["m", "mx"], ["y"], name="add")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "m.onnx")
    x = np.random.default_rng(99).standard_normal((1, 8)).astype(np.float32)
    expected = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = actsparse.compile(str(tmp_path / "m.onnx"), output=tmp_path / "m.actsparse").run(x=x)["y"]
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_a_crash_in_the_child_is_one_error_and_leaves_no_temp_files(tmp_path):
    output = tmp_path / "model.actsparse"
    staging = tmp_path / ".model.actsparse.tmp-abc"
    staging.mkdir()

    def crash() -> int:
        os.kill(os.getpid(), signal.SIGSEGV)
        return 0

    with pytest.raises(ActsparseError, match=r"the compiler crashed on this model \(SIGSEGV\); nothing was written"):
        run_crash_guarded(crash, str(output))
    assert not staging.exists() and not output.exists()
    assert run_crash_guarded(lambda: 3) == 3  # a normal exit status passes through
