"""GradualMagnitudePruner: the cubic schedule and masks on a tiny MLP being trained."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

from actsparse.errors import ActsparseError  # noqa: E402
from actsparse.train import GradualMagnitudePruner, cubic_sparsity  # noqa: E402


def test_cubic_schedule():
    assert cubic_sparsity(0, 0.8, 10, 110) == 0.0
    assert cubic_sparsity(10, 0.8, 10, 110) == pytest.approx(0.0)
    assert cubic_sparsity(60, 0.8, 10, 110) == pytest.approx(0.8 * (1 - 0.5 ** 3))  # 0.7 at half time
    assert cubic_sparsity(110, 0.8, 10, 110) == 0.8 and cubic_sparsity(500, 0.8, 10, 110) == 0.8
    assert cubic_sparsity(10, 0.9, 10, 110, initial_sparsity=0.5) == pytest.approx(0.5)
    values = [cubic_sparsity(t, 0.9, 0, 100) for t in range(101)]
    steps = [b - a for a, b in zip(values, values[1:])]
    assert all(s >= 0 for s in steps) and steps[0] > steps[-1]  # rises fast first, then slowly


@pytest.fixture(autouse=True)
def one_thread():
    """A tiny MLP trains fastest on one thread (and leaves the other cores to other work)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _task(seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(512, 16, generator=generator)
    y = (x[:, :4].sum(dim=1) > 0).long()  # only 4 inputs matter: a sparse net can learn it
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 2))
    return model, x, y


def _train(model, x, y, pruner, steps):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    history = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        pruner.step()
        history.append(pruner.sparsity())
    return history


def test_layer_scope_reaches_final_sparsity_and_keeps_accuracy():
    model, x, y = _task()
    pruner = GradualMagnitudePruner(model, final_sparsity=0.8, start_step=20, end_step=120, frequency=10)
    history = _train(model, x, y, pruner, 200)
    assert history[18] == [0.0, 0.0]  # nothing before start_step
    assert history[-1] == pytest.approx([0.8, 0.8], abs=1 / 128)  # whole weights: 102 of 128
    # between updates the optimizer cannot revive pruned weights
    first = [h[0] for h in history]
    assert all(b >= a - 1e-9 for a, b in zip(first, first[1:]))
    assert first[69] == pytest.approx(cubic_sparsity(70, 0.8, 20, 120), abs=2e-3)
    accuracy = (model(x).argmax(dim=1) == y).float().mean().item()
    assert accuracy > 0.9


def test_global_scope_prunes_layers_unevenly():
    model, x, y = _task(1)
    with torch.no_grad():
        model[2].weight.mul_(0.01)  # a layer of small weights takes most of a global budget
    pruner = GradualMagnitudePruner(model, final_sparsity=0.5, start_step=0, end_step=10, frequency=5, scope="global")
    pruner.step(10)
    first, second = pruner.sparsity()
    total = (first * 16 * 64 + second * 64 * 2) / (16 * 64 + 64 * 2)
    assert total == pytest.approx(0.5, abs=1e-3)
    assert second > 0.99 and first < 0.5


@pytest.mark.parametrize("kwargs, message", [
    ({"final_sparsity": 1.5}, "final_sparsity <= 1"),
    ({"start_step": 10, "end_step": 5}, "start_step < end_step"),
    ({"frequency": 0}, "frequency must be at least 1"),
    ({"scope": "model"}, "scope must be"),
])
def test_bad_arguments(kwargs, message):
    model, _, _ = _task()
    args = {"final_sparsity": 0.5, "start_step": 0, "end_step": 10} | kwargs
    with pytest.raises(ActsparseError, match=message):
        GradualMagnitudePruner(model, **args)
    with pytest.raises(ActsparseError, match="no nn.Linear"):
        GradualMagnitudePruner(nn.ReLU(), 0.5, 0, 10)
