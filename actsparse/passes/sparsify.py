"""sparsify: training-free activation sparsity on the inputs of linear layers.

Before: y = x @ W
After:  y = actsparse.Sparsify(x, t) @ W                      (method=teal:  keep |x_k| > t)
        y = actsparse.SparsifyWeighted(x, t, ||W_k||) @ W      (method=wina:  keep |x_k|*||W[k,:]|| > t)
        FFN: h = act(gate) -> h = Sparsify(act(gate), t)       (method=cats: the gate activation only)

One threshold per sparsified value, calibrated so that the target fraction of its entries
is dropped on the calibration set. Linears that read the same value (q/k/v, gate/up) share
one Sparsify node; other readers (residual adds) keep the dense value. A sparse kernel then
skips the weight rows of dropped channels: time ~ (1 - sparsity) of the dense GEMV.

allocate=uniform gives every layer the target sparsity; allocate=greedy (TEAL) hands out
sparsity in steps to the layer whose output error grows least per weight byte skipped, until
the byte-weighted average reaches the target. Approximate: the pipeline reports the cost.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx_ir as ir

from actsparse.calibrate.stats import as_rows, collect_values
from actsparse.errors import ActsparseError
from actsparse.ir.blocks import Linear, find_blocks
from actsparse.ir.custom_ops import add_initializer, insert_sparsify
from actsparse.passes.base import ActsparsePass, option, register

GREEDY_STEP = 0.05
MAX_ERROR_ROWS = 1024  # rows of calibration activations used for the greedy error curves


@dataclass
class SparsifyOptions:
    method: Literal["teal", "wina", "cats"] = option("teal", "teal: |x|, wina: |x|*row norm of W, cats: gate activation")
    sparsity: float = option(0.5, "target fraction of dropped entries (0..1)")
    scope: Literal["down", "ffn", "attention", "all", "linears"] = option(
        "all", "down: FFN down inputs; ffn: FFN inputs; attention: q/k/v/o; all: ffn+attention; linears: every linear")
    allocate: Literal["uniform", "greedy"] = option("uniform", "same sparsity everywhere, or TEAL's greedy allocation")
    overrides: dict[str, float] = option({}, "per-layer sparsity, by group or linear name")

    def validate(self) -> None:
        for name, value in [("sparsity", self.sparsity), *self.overrides.items()]:
            if not 0.0 <= value <= 1.0:
                raise ActsparseError(f"pass 'sparsify': sparsity for {name!r} must be in [0, 1], got {value}")


@dataclass
class _Group:
    """One value to sparsify and the linears that read it."""

    name: str
    value: ir.Value
    linears: list[Linear] = field(default_factory=list)
    readers: list[tuple[ir.Node, int]] = field(default_factory=list)

    @property
    def weight_bytes(self) -> int:
        return sum(l.in_features * l.out_features * 4 for l in self.linears)


@register
class SparsifyPass(ActsparsePass):
    """Insert calibrated activation sparsification (TEAL, WINA, CATS) before linear layers."""

    name = "sparsify"
    exact = False
    needs_calibration = True
    Options = SparsifyOptions

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        groups = self._groups(model)
        if not groups:
            raise ActsparseError(f"pass 'sparsify': no {self.options.scope!r} layers found to sparsify")
        samples = self.context.require_calibration(self.name)
        activations = collect_values(model, [g.value.name for g in groups], samples)
        rows = {g.name: as_rows(activations[g.value.name], _channels(g)) for g in groups}
        scales = {g.name: _channel_scale(g) if self.options.method == "wina" else None for g in groups}
        scores = {g.name: _scores(rows[g.name], scales[g.name]) for g in groups}
        targets = self._allocate(groups, rows, scores)
        layers = []
        for group in groups:
            target = targets[group.name]
            threshold = _threshold(scores[group.name], target)
            dropped = float(np.mean(scores[group.name] <= threshold)) if target > 0 else 0.0
            if target > 0:
                self._insert(model, group, threshold, scales[group.name])
            layers.append({
                "name": group.name, "linears": [l.name for l in group.linears], "target": round(target, 4),
                "calibrated_sparsity": round(dropped, 4), "threshold": float(threshold), "weight_bytes": group.weight_bytes,
            })
        self.report = _summary(model, layers) | {"method": self.options.method, "allocate": self.options.allocate, "layers": layers}
        return ir.passes.PassResult(model, modified=any(l["target"] > 0 for l in layers))

    # --- which values ------------------------------------------------------------------

    def _groups(self, model: ir.Model) -> list[_Group]:
        blocks = find_blocks(model)
        if self.options.method == "cats":
            return [self._cats_group(block) for block in blocks.ffn if block.kind == "gated" or block.activation is not None]
        scope = self.options.scope
        linears: list[Linear] = []
        if scope in ("down", "ffn", "all"):
            for block in blocks.ffn:
                linears += [block.down] if scope == "down" else [l for l in (block.gate, block.up, block.down) if l]
        if scope in ("attention", "all"):
            for block in blocks.attention:
                linears += [l for l in (block.q, block.k, block.v, block.o) if l]
        if scope == "linears":
            linears = list(blocks.linears)
        groups: dict[int, _Group] = {}
        for linear in dict.fromkeys(linears):  # fused qkv appears three times
            group = groups.setdefault(id(linear.input), _Group("", linear.input))
            group.linears.append(linear)
            group.readers.append((linear.node, _input_index(linear)))
        for group in groups.values():
            group.name = "+".join(l.name for l in group.linears)
        return list(groups.values())

    def _cats_group(self, block) -> _Group:
        act = block.activation
        readers = [(node, index) for node, index in act.output.uses()]
        return _Group(f"{block.name}.act", act.output, [block.down] if block.kind == "mlp" else [block.up, block.down], readers)

    # --- how much -------------------------------------------------------------------

    def _allocate(self, groups, rows, scores) -> dict[str, float]:
        target = self.options.sparsity
        if self.options.allocate == "greedy" and 0 < target < 1 and len(groups) > 1:
            allocation = greedy_allocation(groups, rows, scores, target)
        else:
            allocation = {g.name: target for g in groups}
        for key, value in self.options.overrides.items():
            matches = [g for g in groups if key == g.name or key in [l.name for l in g.linears]]
            if not matches:
                raise ActsparseError(f"pass 'sparsify': override {key!r} names no sparsified layer; "
                                     f"layers: {', '.join(g.name for g in groups)}")
            for group in matches:
                allocation[group.name] = value
        return allocation

    # --- rewrite ---------------------------------------------------------------------

    def _insert(self, model: ir.Model, group: _Group, threshold: float, scale: np.ndarray | None) -> None:
        dtype = group.value.dtype.numpy() if group.value.dtype is not None else np.float32
        base = group.linears[0].name if self.options.method != "cats" else group.name
        t = add_initializer(model, f"{base}.sparsify_threshold", np.array(threshold, dtype=dtype))
        s = add_initializer(model, f"{base}.sparsify_scale", scale.astype(dtype)) if scale is not None else None
        sparse = insert_sparsify(model, group.value, t, s, name=f"{base}.sparsify")
        for node, index in group.readers:
            node.replace_input_with(index, sparse)


def greedy_allocation(groups: list[_Group], rows: dict, scores: dict, target: float) -> dict[str, float]:
    """TEAL-style greedy: raise sparsity in steps where relative output error grows least per
    byte skipped, until the byte-weighted mean sparsity reaches `target`."""
    levels = np.arange(0.0, 1.0 + 1e-9, GREEDY_STEP)
    curves = {g.name: _error_curve(g, rows[g.name], scores[g.name], levels) for g in groups}
    weight = {g.name: g.weight_bytes for g in groups}
    total = sum(weight.values())
    step = {name: 0 for name in curves}
    reached = 0.0
    while reached < target - 1e-9:
        def cost(name):
            i = step[name]
            return np.inf if i + 1 >= len(levels) else (curves[name][i + 1] - curves[name][i]) / weight[name]

        best = min(curves, key=cost)
        if not np.isfinite(cost(best)):
            break
        step[best] += 1
        reached += GREEDY_STEP * weight[best] / total
    allocation = {name: float(levels[i]) for name, i in step.items()}
    # The last step may overshoot; give the excess back on the layer that took it.
    if reached > target:
        allocation[best] = max(0.0, allocation[best] - (reached - target) * total / weight[best])
    return allocation


def _error_curve(group: _Group, x: np.ndarray, scores: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Relative output error ||(x - sparse(x)) W||^2 / ||x W||^2 of the group's linears per level."""
    if len(x) > MAX_ERROR_ROWS:
        pick = np.random.default_rng(0).choice(len(x), MAX_ERROR_ROWS, replace=False)
        x, scores = x[pick], scores[pick]
    weights = [_weight_kn(l) for l in group.linears if l.in_features == x.shape[1]]
    w = np.concatenate(weights, axis=1) if weights else np.eye(x.shape[1], dtype=np.float32)
    reference = float(np.sum((x @ w) ** 2)) or 1.0
    curve = []
    for level in levels:
        t = _threshold(scores, level)
        dropped = np.where(scores <= t, x, 0.0) if level > 0 else np.zeros_like(x)
        curve.append(float(np.sum((dropped @ w) ** 2)) / reference)
    return np.array(curve)


def _threshold(scores: np.ndarray, sparsity: float) -> float:
    if sparsity <= 0:
        return -1.0
    return float(np.quantile(scores, min(sparsity, 1.0)))


def _scores(x: np.ndarray, scale: np.ndarray | None) -> np.ndarray:
    magnitude = np.abs(x)
    return magnitude * scale if scale is not None else magnitude


def _channel_scale(group: _Group) -> np.ndarray:
    """WINA's per-input-channel weight norm; linears sharing the input are treated as one."""
    squared = sum(np.sum(_weight_kn(l).astype(np.float64) ** 2, axis=1) for l in group.linears)
    return np.sqrt(squared).astype(np.float32)


def _weight_kn(linear: Linear) -> np.ndarray:
    w = linear.weight.const_value.numpy().astype(np.float32)
    return w.T if linear.weight_layout == "NK" else w


def _channels(group: _Group) -> int:
    shape = group.value.shape
    if shape is not None and isinstance(shape[-1], int):
        return shape[-1]
    return group.linears[0].in_features


def _input_index(linear: Linear) -> int:
    for index, value in enumerate(linear.node.inputs):
        if value is linear.input:
            return index
    raise ActsparseError(f"linear {linear.name!r}: its input is not an input of its node")


def _summary(model: ir.Model, layers: list[dict]) -> dict:
    from actsparse.ir.blocks import find_linears

    sparsified = sum(l["weight_bytes"] for l in layers)
    weighted = sum(l["target"] * l["weight_bytes"] for l in layers)
    all_linear_bytes = sum(l.in_features * l.out_features * 4 for l in find_linears(model)) or 1
    return {
        "sparsity_mean": round(float(np.mean([l["target"] for l in layers])), 4),
        "sparsity_weighted": round(weighted / sparsified, 4) if sparsified else 0.0,
        "skippable_weight_fraction": round(weighted / all_linear_bytes, 4),
    }
