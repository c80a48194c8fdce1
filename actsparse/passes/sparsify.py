"""sparsify: training-free activation sparsity on the inputs of linear layers.

Before: y = x @ W
After:  y = actsparse.Sparsify(x, t) @ W                      (method=teal:  keep |x_k| > t)
        y = actsparse.SparsifyWeighted(x, t, ||W_k||) @ W      (method=wina:  keep |x_k|*||W[k,:]|| > t)
        FFN: h = act(gate) -> h = Sparsify(act(gate), t)       (method=cats: the gate activation only)

One threshold per sparsified value, calibrated so that the target fraction of its entries
is dropped on the calibration set. Linears that read the same value (q/k/v, gate/up) share
one Sparsify node; other readers (residual adds) keep the dense value. A sparse kernel then
skips the weight rows of dropped channels: time ~ (1 - sparsity) of the dense GEMV.

allocate=uniform gives every layer the target sparsity; allocate=greedy (TEAL) measures, for
each layer alone, the model's output error at each sparsity level on calibration samples, then
hands out sparsity in 5 % steps to the layer whose error grows least per weight byte skipped,
until the byte-weighted average reaches the target. Approximate: the pipeline reports the cost.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common

from actsparse.calibrate.stats import as_rows, collect_values, token_masks
from actsparse.errors import ActsparseError
from actsparse.ir.blocks import Linear, find_blocks
from actsparse.ir.custom_ops import add_initializer, insert_sparsify, unique_name
from actsparse.passes.base import ActsparsePass, option, register
from actsparse.passes.overrides import apply_overrides, overrides_option

LEVELS = np.round(np.arange(0.0, 1.0, 0.05), 2)  # sparsity levels greedy allocation moves through
GREEDY_SAMPLES = 4  # calibration samples used to measure output error per level


@dataclass
class SparsifyOptions:
    """Options of `sparsify` (approximate).

    Attributes:
        method: how an entry's importance is scored: "teal" (|x|, default), "wina" (|x| times the
            row norm of W) or "cats" (the gate activation, FFN blocks only).
        sparsity: target fraction of dropped entries per layer (default 0.5; 0..1).
        scope: which linear inputs: "down", "ffn", "attention", "all" (default: ffn + attention)
            or "linears" (every linear).
        allocate: "uniform" (default: the same sparsity everywhere) or "greedy" (TEAL's
            allocation of the same average by measured output error).
        overrides: per-layer sparsity (0..1) by block, linear or group name (passes/overrides.py).
    """
    method: Literal["teal", "wina", "cats"] = option("teal", "teal: |x|, wina: |x|*row norm of W, cats: gate activation")
    sparsity: float = option(0.5, "target fraction of dropped entries (0..1)")
    scope: Literal["down", "ffn", "attention", "all", "linears"] = option(
        "all", "down: FFN down inputs; ffn: FFN inputs; attention: q/k/v/o; all: ffn+attention; linears: every linear")
    allocate: Literal["uniform", "greedy"] = option("uniform", "same sparsity everywhere, or TEAL's greedy allocation")
    overrides: dict[str, float] = overrides_option("sparsity")

    def validate(self) -> None:
        for name, value in [("sparsity", self.sparsity), *self.overrides.items()]:
            if not 0.0 <= value <= 1.0:
                raise ActsparseError(f"pass 'sparsify': sparsity for {name!r} must be in [0, 1], got {value}")


@dataclass
class _Group:
    """One value to sparsify and the linears that read it."""

    name: str
    value: ir.Value
    channels: int
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
    Options = SparsifyOptions

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        groups = self._groups(model)
        if not groups:
            raise ActsparseError(f"pass 'sparsify': no {self.options.scope!r} layers found to sparsify")
        samples = self.context.require_calibration(self.name)
        activations = collect_values(model, [g.value.name for g in groups], samples,
                                     on_sample=self.context.on_sample)
        rows = {g.name: as_rows(activations[g.value.name], g.channels) for g in groups}
        scales = {g.name: _channel_scale(g) if self.options.method == "wina" else None for g in groups}
        scores = {g.name: _scores(rows[g.name], scales[g.name]) for g in groups}
        # Thresholds start as graph inputs so that greedy allocation can try levels in one session.
        thresholds = {g.name: self._insert(model, g, scales[g.name]) for g in groups}
        targets = self._allocate(model, groups, scores, thresholds, samples)
        layers = []
        for group in groups:
            target = targets[group.name]
            threshold = _threshold(scores[group.name], target)
            dropped = float(np.mean(scores[group.name] <= threshold)) if target > 0 else 0.0
            _freeze_threshold(model, group, thresholds[group.name], threshold, keep=target > 0)
            layers.append({
                "name": group.name, "linears": [l.name for l in group.linears], "target": round(target, 4),
                "calibrated_sparsity": round(dropped, 4), "threshold": float(threshold), "weight_bytes": group.weight_bytes,
            })
        for cleanup in (common.RemoveUnusedNodesPass(), common.RemoveUnusedFunctionsPass(),
                        common.RemoveUnusedOpsetsPass()):
            model = cleanup(model).model
        self.report = _summary(model, layers) | {"method": self.options.method, "allocate": self.options.allocate,
                                                 "layers": layers}
        return ir.passes.PassResult(model, modified=any(l["target"] > 0 for l in layers))

    # --- which values ------------------------------------------------------------------

    def _groups(self, model: ir.Model) -> list[_Group]:
        blocks = find_blocks(model)
        if self.options.method == "cats":
            return [self._cats_group(block) for block in blocks.ffn]
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
        for linear in dict.fromkeys(linears):  # a fused qkv linear appears three times
            group = groups.setdefault(id(linear.input), _Group("", linear.input, linear.in_features))
            group.linears.append(linear)
            group.readers.append((linear.node, _input_index(linear)))
        for group in groups.values():
            group.name = "+".join(l.name for l in group.linears)
        return list(groups.values())

    def _cats_group(self, block) -> _Group:
        act = block.activation
        readers = list(act.output.uses())
        linears = [block.down] if block.kind == "mlp" else [block.up, block.down]
        return _Group(f"{block.name}.act", act.output, block.down.in_features, linears, readers)

    # --- how much -------------------------------------------------------------------

    def _allocate(self, model, groups, scores, thresholds, samples) -> dict[str, float]:
        target = self.options.sparsity
        if self.options.allocate == "greedy" and 0 < target < 1 and len(groups) > 1:
            curves = output_error_curves(model, groups, scores, thresholds, samples[:GREEDY_SAMPLES])
            allocation = greedy_allocation(groups, curves, target)
        else:
            allocation = {g.name: target for g in groups}
        return apply_overrides(self.name, self.options.overrides, allocation,
                               {g.name: {l.name for l in g.linears} for g in groups}, model, noun="sparsified layer")

    # --- rewrite ---------------------------------------------------------------------

    def _insert(self, model: ir.Model, group: _Group, scale: np.ndarray | None) -> ir.Value:
        """Sparsify the group's value for its linear readers; the threshold is a new graph input
        until `_freeze_threshold` turns it into an initializer."""
        dtype = _activation_dtype(group)
        base = group.linears[0].name if self.options.method != "cats" else group.name
        t = ir.Value(name=unique_name(model, f"{base}.sparsify_threshold"), shape=ir.Shape([]), type=ir.TensorType(dtype))
        model.graph.inputs.append(t)
        s = add_initializer(model, f"{base}.sparsify_scale", scale.astype(dtype.numpy())) if scale is not None else None
        sparse = insert_sparsify(model, group.value, t, s, name=f"{base}.sparsify")
        for node, index in group.readers:
            node.replace_input_with(index, sparse)
        return t


def _freeze_threshold(model: ir.Model, group: _Group, t: ir.Value, threshold: float, *, keep: bool) -> None:
    model.graph.inputs.remove(t)
    t.const_value = ir.tensor(np.array(threshold, dtype=t.dtype.numpy()), name=t.name)
    model.graph.register_initializer(t)
    if not keep:  # nothing to drop: readers go back to the dense value
        for node, index in group.readers:
            node.replace_input_with(index, group.value)


def output_error_curves(model, groups, scores, thresholds, samples) -> dict[str, np.ndarray]:
    """For each group alone at each level: squared error of the model's float outputs,
    relative to their squared norm, over the samples."""
    from actsparse.ir.ort_session import ort_session

    session = ort_session(model)
    float_outputs = [i for i, o in enumerate(session.get_outputs()) if "float" in o.type]
    names = {g.name: thresholds[g.name].name for g in groups}
    off = {g.name: np.array(-1.0, dtype=thresholds[g.name].dtype.numpy()) for g in groups}

    def run(level_of: dict[str, np.ndarray]):
        feeds = {names[g]: v for g, v in level_of.items()}
        return [[out[i].astype(np.float64) for i in float_outputs] for out in
                (session.run(None, sample | feeds) for sample in samples)]

    masks = token_masks(samples)  # padding tokens' outputs do not count

    def squared(outputs_per_sample):  # summed over real tokens only, where a mask says which
        total = 0.0
        for index, outputs in enumerate(outputs_per_sample):
            for out in outputs:
                mask = masks[index] if masks is not None else None
                total += float(np.sum(out[mask] ** 2 if mask is not None and out.shape[:-1] == mask.shape else out ** 2))
        return total

    reference = run(off)
    norm = squared(reference) or 1.0
    curves = {}
    for group in groups:
        curve = [0.0]
        for level in LEVELS[1:]:
            t = np.array(_threshold(scores[group.name], level), dtype=off[group.name].dtype)
            outputs = run(off | {group.name: t})
            curve.append(squared([[a - b for a, b in zip(outs, refs)] for outs, refs in zip(outputs, reference)]) / norm)
        curves[group.name] = np.maximum.accumulate(np.array(curve))  # more sparsity never helps
    return curves


def greedy_allocation(groups: list[_Group], curves: dict[str, np.ndarray], target: float) -> dict[str, float]:
    """TEAL-style greedy: raise sparsity one level at a time where the model's output error
    grows least per weight byte skipped, until the byte-weighted mean reaches `target`."""
    weight = {g.name: g.weight_bytes for g in groups}
    total = sum(weight.values())
    step = {name: 0 for name in curves}
    reached, last = 0.0, None

    def cost(name):
        i = step[name]
        return np.inf if i + 1 >= len(LEVELS) else (curves[name][i + 1] - curves[name][i]) / weight[name]

    while reached < target - 1e-9:
        last = min(curves, key=cost)
        if not np.isfinite(cost(last)):
            break
        step[last] += 1
        reached += (LEVELS[1] - LEVELS[0]) * weight[last] / total
    allocation = {name: float(LEVELS[i]) for name, i in step.items()}
    if last is not None and reached > target:  # give back the last step's overshoot
        allocation[last] = max(0.0, allocation[last] - (reached - target) * total / weight[last])
    return allocation


def _threshold(scores: np.ndarray, sparsity: float) -> float:
    if sparsity <= 0:
        return -1.0
    return float(np.quantile(scores, min(sparsity, 1.0)))


def _scores(x: np.ndarray, scale: np.ndarray | None) -> np.ndarray:
    magnitude = np.abs(x)
    return magnitude * scale if scale is not None else magnitude


def _activation_dtype(group: _Group) -> ir.DataType:
    """The sparsified value's float type: its own when known, else the type its linear computes in
    (an fp16 model needs an fp16 threshold: onnxruntime refuses Greater(fp16, fp32)): the target
    of a Cast on the weight's way to the linear (fp16 weights cast to float32), else the weight's."""
    if group.value.dtype is not None:
        return group.value.dtype
    linear = group.linears[0] if group.linears else None
    casts = [node for node in linear.weight_nodes if node.op_type == "Cast"] if linear is not None else []
    if casts:
        return ir.DataType(casts[-1].attributes.get_int("to"))
    weight = linear.weight.const_value if linear is not None else None
    return weight.dtype if weight is not None and weight.dtype.is_floating_point() else ir.DataType.FLOAT


def _channel_scale(group: _Group) -> np.ndarray:
    """WINA's per-input-channel weight norm; linears sharing the input are treated as one."""
    squared = sum(np.sum(_weight_kn(l).astype(np.float64) ** 2, axis=1) for l in group.linears)
    # An all-zero weight row gives scale 0: that channel never matters and is always dropped.
    return np.sqrt(squared).astype(np.float32)


def _weight_kn(linear: Linear) -> np.ndarray:
    return linear.weight_array("KN").astype(np.float32)


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
