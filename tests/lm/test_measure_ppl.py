"""actsparse.lm.perplexity: ONNX perplexity, PPL-p% search (grid + bisection), plot, CLI errors."""

from __future__ import annotations

import json

import numpy as np
import pytest

from actsparse.errors import ActsparseError
from actsparse.lm.perplexity import (main, method_pass, onnx_perplexity, parse_tolerance, plot_curves, ppl_tolerance,
                                   windows_as_samples)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny LM (random init), its ONNX export at L=16, windows and calibration."""
    import torch

    from actsparse.frontend.torch_export import export_hf
    from actsparse.lm.model import build_lm

    torch.set_num_threads(1)
    model = build_lm("tiny", seed=1).eval()
    rng = np.random.default_rng(0)
    windows = rng.integers(0, 256, (4, 17)).astype(np.int64)
    calibration = windows_as_samples(rng.integers(0, 256, (6, 17)).astype(np.int64))
    return model, export_hf(model, seq_len=16), windows, calibration


def test_onnx_perplexity_equals_torch(tiny):
    from actsparse.lm.train import perplexity

    model, onnx_model, windows, _ = tiny
    assert onnx_perplexity(onnx_model, windows) == pytest.approx(perplexity(model, windows), rel=1e-4)


def test_tolerance_search_finds_the_last_level_within(tiny, tmp_path):
    _, onnx_model, windows, calibration = tiny
    result = ppl_tolerance(onnx_model, calibration, windows, tolerance=0.001, methods=("teal", "chess"),
                           levels=(0.3, 0.6, 0.9))
    assert set(result["methods"]) == {"teal", "chess"}
    for data in result["methods"].values():
        curve = data["curve"]
        assert [p["sparsity"] for p in curve] == sorted(p["sparsity"] for p in curve)
        best = data["best_sparsity"]
        # everything up to the best level is within the limit; the next measured level is not
        assert all(p["perplexity"] <= result["limit"] for p in curve if p["sparsity"] <= best)
        above = [p for p in curve if p["sparsity"] > best]
        assert not above or above[0]["perplexity"] > result["limit"]
    png = plot_curves(result, tmp_path / "curve.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    json.dumps(result)


def test_options_and_errors():
    assert parse_tolerance("1%") == pytest.approx(0.01) and parse_tolerance("0.05") == 0.05
    for bad in ("abc", "0%", "-1"):
        with pytest.raises(ActsparseError):
            parse_tolerance(bad)
    assert method_pass("chess", 0.4) == ("chess", {"sparsity": 0.4})
    assert method_pass("teal", 0.4)[1]["scope"] == "ffn"
    assert method_pass("rsparse", 0.6) == ("rsparse", {"scope": "ffn", "sparsity": 0.6})
    assert method_pass("rsparse-act", 0.6)[1]["basis"] == "activation"
    with pytest.raises(ActsparseError, match="unknown method"):
        method_pass("magic", 0.4)


def test_cli_refuses_bad_input(tmp_path, capsys):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx")
    assert main([str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "error:" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
