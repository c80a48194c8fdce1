"""chess pass: channel-wise thresholds on act(gate) through SparsifyWeighted(a, 1, 1/t)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest

from actsparse.calibrate.stats import as_rows, collect_values
from actsparse.errors import ActsparseError
from actsparse.frontend.onnx_file import load_model
from actsparse.ir.blocks import find_blocks
from actsparse.passes import PassContext, make_pass
from actsparse.passes.chess import channel_thresholds
from tests.models import SEQ_LEN, VOCAB


def _calibration(count: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [{"input_ids": rng.integers(0, VOCAB, (1, SEQ_LEN)).astype(np.int64)} for _ in range(count)]


def _chess(model, **options):
    p = make_pass("chess", options, PassContext(calibration=_calibration()))
    return p(model).model, p.report


def test_sparsify_weighted_sits_between_activation_and_up_product(llama_onnx):
    before = load_model(llama_onnx)
    acts = [b.activation.output.name for b in find_blocks(before).ffn]
    model, report = _chess(before, sparsity=0.5)
    for block in find_blocks(model).ffn:
        mul = block.down.input.producer()
        sparse = [v.producer() for v in mul.inputs if v.producer() is not None and v.producer().domain == "actsparse"]
        assert len(sparse) == 1 and sparse[0].op_type == "SparsifyWeighted"
        assert sparse[0].inputs[0].name in acts
        threshold = ir.convenience.get_const_tensor(sparse[0].inputs[1]).numpy()
        assert threshold == 1.0
        assert sparse[0].inputs[2].shape == ir.Shape([block.down.in_features])
    for layer in report["layers"]:
        assert layer["calibrated_sparsity"] == pytest.approx(0.5, abs=0.02)
        assert layer["threshold_max"] > layer["threshold_min"]  # really per channel


def test_every_channel_is_dropped_at_the_target_rate(llama_onnx):
    model, _ = _chess(load_model(llama_onnx), sparsity=0.4)
    sparse_values = [b.down.input.producer().inputs[0].name for b in find_blocks(model).ffn]
    values = collect_values(model, sparse_values, _calibration())
    for name in sparse_values:
        rows = as_rows(values[name], values[name][0].shape[-1])
        per_channel = np.mean(rows == 0, axis=0)
        assert per_channel.min() >= 0.35 and per_channel.max() <= 0.45


def test_numerics_equal_per_channel_masking(llama_onnx):
    """The sparsified activation equals numpy's |a_i| > t_i mask of the original activation."""
    original = load_model(llama_onnx)
    block = find_blocks(original).ffn[0]
    act_name = block.activation.output.name
    calib = _calibration()
    a_calib = as_rows(collect_values(original, [act_name], calib)[act_name], block.down.in_features)
    t = channel_thresholds(np.abs(a_calib), 0.5)
    model, _ = _chess(original, sparsity=0.5)
    sparse_name = find_blocks(model).ffn[0].down.input.producer().inputs[0].name
    probe = _calibration(3, seed=5)
    got = collect_values(model, [sparse_name, act_name], probe)
    for a, s in zip(got[act_name], got[sparse_name]):
        np.testing.assert_array_equal(s, np.where(np.abs(a) > t, a, 0))


def test_zero_sparsity_changes_nothing_and_bad_options(llama_onnx):
    model, report = _chess(load_model(llama_onnx), sparsity=0.0)
    assert not [n for n in model.graph if n.domain == "actsparse"]
    with pytest.raises(ActsparseError, match="in \\[0, 1\\)"):
        make_pass("chess", {"sparsity": 1.0})
    with pytest.raises(ActsparseError, match="names no FFN block"):
        _chess(load_model(llama_onnx), overrides={"nope": 0.3})
