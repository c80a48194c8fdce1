"""Gradual magnitude pruning of nn.Linear weights during training (Zhu & Gupta 2017).

Sparsity rises from `initial_sparsity` to `final_sparsity` between `start_step` and `end_step`
on the cubic schedule  s_t = s_f + (s_i - s_f) * (1 - (t - t_0) / (t_end - t_0))^3,
updated every `frequency` steps: fast at first, when many weights are redundant, slowly near
the end. Each update recomputes the masks from the current |w| (per layer or with one global
threshold); between updates the masks are re-applied after every optimizer step, so pruned
weights stay zero. Call `step()` right after `optimizer.step()`.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from actsparse.errors import ActsparseError


def cubic_sparsity(step: int, final_sparsity: float, start_step: int, end_step: int,
                   initial_sparsity: float = 0.0) -> float:
    """The target sparsity at `step` on the Zhu & Gupta cubic schedule."""
    if step < start_step:
        return 0.0
    if step >= end_step:
        return final_sparsity
    progress = (step - start_step) / (end_step - start_step)
    return final_sparsity + (initial_sparsity - final_sparsity) * (1.0 - progress) ** 3


class GradualMagnitudePruner:
    """Masks the weights of every nn.Linear in `model` on the cubic schedule.

    scope="layer": every layer reaches the target sparsity; scope="global": one magnitude
    threshold over all layers. `layers` limits pruning to the given modules.
    """

    def __init__(self, model: nn.Module, final_sparsity: float, start_step: int, end_step: int,
                 frequency: int = 100, scope: Literal["layer", "global"] = "layer", *,
                 initial_sparsity: float = 0.0, layers: list[nn.Linear] | None = None):
        if not 0.0 <= initial_sparsity <= final_sparsity <= 1.0:
            raise ActsparseError(f"need 0 <= initial_sparsity <= final_sparsity <= 1, "
                                 f"got {initial_sparsity} and {final_sparsity}")
        if not 0 <= start_step < end_step:
            raise ActsparseError(f"need 0 <= start_step < end_step, got {start_step} and {end_step}")
        if frequency < 1:
            raise ActsparseError(f"frequency must be at least 1, got {frequency}")
        if scope not in ("layer", "global"):
            raise ActsparseError(f"scope must be 'layer' or 'global', got {scope!r}")
        self.layers = list(layers) if layers is not None else [m for m in model.modules() if isinstance(m, nn.Linear)]
        if not self.layers:
            raise ActsparseError("the model has no nn.Linear layer to prune")
        self.final_sparsity, self.initial_sparsity = final_sparsity, initial_sparsity
        self.start_step, self.end_step, self.frequency, self.scope = start_step, end_step, frequency, scope
        self.masks = [torch.ones_like(layer.weight, dtype=torch.bool) for layer in self.layers]
        self.step_count = 0
        self.target = 0.0

    def sparsity_at(self, step: int) -> float:
        return cubic_sparsity(step, self.final_sparsity, self.start_step, self.end_step, self.initial_sparsity)

    def step(self, step: int | None = None) -> None:
        """Advance one training step (or go to `step`): update the masks when the schedule says so,
        then zero the masked weights."""
        self.step_count = self.step_count + 1 if step is None else step
        t = self.step_count
        on_schedule = (t - self.start_step) % self.frequency == 0 or t == self.end_step
        if self.start_step <= t <= self.end_step and on_schedule:
            self.target = self.sparsity_at(t)
            self._update_masks(self.target)
        self.apply_masks()

    @torch.no_grad()
    def apply_masks(self) -> None:
        for layer, mask in zip(self.layers, self.masks):
            layer.weight.mul_(mask)

    def sparsity(self) -> list[float]:
        """The fraction of zero weights of each layer now."""
        return [float((layer.weight == 0).float().mean()) for layer in self.layers]

    @torch.no_grad()
    def _update_masks(self, sparsity: float) -> None:
        if self.scope == "global":
            magnitudes = torch.cat([layer.weight.abs().flatten() for layer in self.layers])
            threshold = _kth_smallest(magnitudes, sparsity)
            self.masks = [layer.weight.abs() > threshold if threshold is not None else
                          torch.ones_like(layer.weight, dtype=torch.bool) for layer in self.layers]
        else:
            self.masks = [_layer_mask(layer.weight, sparsity) for layer in self.layers]


def _kth_smallest(values: torch.Tensor, fraction: float) -> torch.Tensor | None:
    count = int(round(fraction * values.numel()))
    return torch.kthvalue(values, count).values if count > 0 else None


def _layer_mask(weight: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep all but the `sparsity` fraction of smallest |w| (exactly that many, ties by position)."""
    count = int(round(sparsity * weight.numel()))
    mask = torch.ones(weight.numel(), dtype=torch.bool, device=weight.device)
    if count:
        mask[torch.argsort(weight.abs().flatten(), stable=True)[:count]] = False
    return mask.view_as(weight)
