"""actsparse.train.relufy: activation swap, ProSparse L1 schedule, fine-tuning, ONNX export."""

from __future__ import annotations

import math

import numpy as np
import pytest

from actsparse.errors import ActsparseError
from actsparse.train.relufy import (SparseActivation, activation_sparsity, l1_schedule, relufy,
                                    sparse_activations, swap_activations)


def _tokens(n: int = 4000) -> np.ndarray:
    """A learnable toy corpus: repeated Python-like lines as bytes."""
    text = "".join(f"x{i % 7} = f(x{(i + 1) % 7}) + {i % 10}\n" for i in range(n // 16))
    return np.frombuffer(text.encode(), np.uint8).astype(np.uint16)


def _windows(tokens, length=24, count=6):
    from actsparse.lm.data import eval_windows

    return eval_windows(tokens, length, count)


@pytest.fixture
def tiny_lm():
    import torch

    from actsparse.lm.model import build_lm

    torch.set_num_threads(1)
    return build_lm("tiny", seed=0)


def test_swap_replaces_every_ffn_activation(tiny_lm):
    swapped = swap_activations(tiny_lm, "shifted_relu", shift=0.1)
    assert swapped == [f"model.layers.{i}.mlp.act_fn" for i in range(2)]
    acts = sparse_activations(tiny_lm)
    assert all(a.act == "shifted_relu" and a.shift == 0.1 for a in acts.values())
    with pytest.raises(ActsparseError, match="no SiLU/GELU"):
        swap_activations(tiny_lm)


@pytest.mark.parametrize("act,expected", [("relu", [0, 0, 0.5, 2]), ("relu2", [0, 0, 0.25, 4]),
                                          ("shifted_relu", [0, 0, 0, 1.5])])
def test_activation_values(act, expected):
    import torch

    y = SparseActivation(act, shift=0.5 if act == "shifted_relu" else 0.0)(torch.tensor([-1.0, 0.0, 0.5, 2.0]))
    np.testing.assert_allclose(y.numpy(), expected)
    with pytest.raises(ActsparseError, match="activation must be"):
        SparseActivation("gelu")


def test_l1_schedule_rises_along_sines_and_holds():
    stages = (0.1, 0.3)
    values = [l1_schedule(s, 100, stages) for s in range(100)]
    assert values[0] == 0.0
    assert all(b >= a - 1e-12 for a, b in zip(values, values[1:]))  # never decreases
    assert values[25] == pytest.approx(0.1) and values[49] == pytest.approx(0.1)
    assert values[75] == pytest.approx(0.3) and values[99] == pytest.approx(0.3)
    assert values[12] == pytest.approx(0.1 * math.sin(math.pi / 2 * 12 / 25))
    assert l1_schedule(5, 100, ()) == 0.0


def test_sparsity_of_smooth_and_relu_activations(tiny_lm):
    windows = _windows(_tokens())
    smooth = activation_sparsity(tiny_lm, windows)
    assert set(smooth) == {f"model.layers.{i}.mlp.act_fn" for i in range(2)}
    assert all(0.2 < v < 0.8 for v in smooth.values())  # random init: about half the gates <= 0
    swap_activations(tiny_lm)
    relu = activation_sparsity(tiny_lm, windows)
    for name in smooth:
        assert relu[name] == pytest.approx(smooth[name], abs=1e-3)  # relu drops exactly those


@pytest.mark.slow
def test_relufy_fine_tunes_raises_sparsity_and_exports(tiny_lm):
    from actsparse.ir.blocks import find_blocks
    from actsparse.lm.train import perplexity
    from actsparse.lm.perplexity import onnx_perplexity

    tokens = _tokens()
    windows = _windows(tokens)
    result = relufy(tiny_lm, tokens, eval_windows=windows, steps=40, lr=3e-3, l1_stages=(0.5, 2.0),
                    seq_len=24, batch=8, export_seq_len=24)
    report = result.report
    assert report["fine_tune"]["steps_done"] == 40
    assert report["after"]["mean_sparsity"] > np.mean(list(report["after_swap"]["sparsity"].values())) + 0.1
    assert report["after"]["perplexity"] < report["after_swap"]["perplexity"]
    assert not any(a.record or a.last is not None for a in sparse_activations(result.model).values())
    blocks = find_blocks(result.onnx).ffn
    assert len(blocks) == 2 and all(b.activation.kind == "relu" for b in blocks)
    assert onnx_perplexity(result.onnx, windows) == pytest.approx(perplexity(result.model, windows), rel=1e-4)
