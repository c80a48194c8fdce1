"""collect_values / as_rows / token_masks: intermediate values through onnxruntime."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper

import actsparse.passes  # noqa: F401  before calibrate.stats, which cannot be imported first (see the xfail below)
from actsparse.calibrate.stats import as_rows, collect_values, token_masks
from actsparse.errors import ActsparseError


def _model() -> ir.Model:
    """y = Relu(x) * 2 with an intermediate value `r`."""
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("Add", ["r", "r"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])])
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def test_collect_values_reads_intermediates_without_changing_the_model():
    model = _model()
    before = ir.serde.serialize_model(model).SerializeToString()
    rng = np.random.default_rng(0)
    samples = [{"x": rng.standard_normal((2, 3)).astype(np.float32)} for _ in range(3)]
    values = collect_values(model, ["r", "y", "x", "r"], samples)
    assert list(values) == ["r", "y", "x"]
    for i, sample in enumerate(samples):
        np.testing.assert_array_equal(values["r"][i], np.maximum(sample["x"], 0))
        np.testing.assert_array_equal(values["y"][i], 2 * np.maximum(sample["x"], 0))
        np.testing.assert_array_equal(values["x"][i], sample["x"])
    assert ir.serde.serialize_model(model).SerializeToString() == before
    assert collect_values(model, [], samples) == {}


def test_collect_values_unknown_name():
    with pytest.raises(ActsparseError, match="value 'nope' not found"):
        collect_values(_model(), ["nope"], [{"x": np.zeros((2, 3), np.float32)}])


def test_as_rows_flattens_and_drops_padding_tokens():
    arrays = [np.arange(24, dtype=np.float32).reshape(1, 4, 6), np.ones((1, 4, 6), np.float32)]
    assert as_rows(arrays, 6).shape == (8, 6)
    masks = [np.array([[1, 1, 0, 0]]), np.array([[1, 1, 1, 0]])]
    rows = as_rows(arrays, 6, masks)
    assert rows.shape == (5, 6)
    np.testing.assert_array_equal(rows[:2], arrays[0][0, :2])


def test_token_masks():
    samples = [{"input_ids": np.ones((1, 3), np.int64), "attention_mask": np.array([[1, 1, 0]])}]
    (mask,) = token_masks(samples)
    np.testing.assert_array_equal(mask, [[True, True, False]])
    assert token_masks([{"input_ids": np.ones((1, 3), np.int64)}]) is None
    assert token_masks([{"attention_mask": np.ones((1, 3), np.float32)}]) is None  # a float mask is not a token mask


def test_stats_imports_first_in_a_fresh_interpreter():
    result = subprocess.run([sys.executable, "-c", "import actsparse.calibrate.stats"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr.strip().splitlines()[-1]
