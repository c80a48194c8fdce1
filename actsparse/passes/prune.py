"""prune: zero weights of the linear layers in place (magnitude or N:M), no retraining.

Before: y = x @ W
After:  y = x @ (W * mask)        mask is not stored: the pruned entries are zeros in W itself

method=magnitude: drop the `sparsity` fraction of smallest |w|, per layer (scope=layer) or with one
threshold over all layers (scope=global). method=nm: in every run of m consecutive weights along
the input dimension K of each output column, keep the n largest |w| (2:4 is what sparse tensor
cores run). A weight shared with other nodes (tied embeddings) is copied first, so the other
readers keep the dense tensor. Approximate: the pipeline reports the accuracy cost; the report
lists the sparsity each layer reached.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common

from actsparse.errors import ActsparseError
from actsparse.ir.blocks import Linear, find_linears
from actsparse.ir.custom_ops import add_initializer
from actsparse.passes.base import ActsparsePass, option, register
from actsparse.passes.overrides import apply_overrides, overrides_option


@dataclass
class PruneOptions:
    """Options of `prune` (approximate).

    Attributes:
        method: "magnitude" (default: the smallest |w| go) or "nm" (n of every m along K).
        sparsity: method=magnitude: fraction of weights set to zero (default 0.5; 0..1).
        scope: method=magnitude: "layer" (default: one threshold per layer) or "global" (one overall).
        n: method=nm: weights kept in every group of m (default 2; 0..m).
        m: method=nm: group length along the input dimension (default 4; >= 1).
        overrides: method=magnitude, scope=layer: per-layer sparsity (0..1) by block or linear
            name (passes/overrides.py).
    """
    method: Literal["magnitude", "nm"] = option("magnitude", "magnitude: smallest |w| go; nm: n of every m along K")
    sparsity: float = option(0.5, "method=magnitude: fraction of weights set to zero (0..1)")
    scope: Literal["layer", "global"] = option("layer", "method=magnitude: one threshold per layer, or one overall")
    n: int = option(2, "method=nm: weights kept in every group of m")
    m: int = option(4, "method=nm: group length along the input dimension")
    overrides: dict[str, float] = overrides_option("sparsity (method=magnitude, scope=layer)")

    def validate(self) -> None:
        where = "pass 'prune'"
        if not 0.0 <= self.sparsity <= 1.0:
            raise ActsparseError(f"{where}: sparsity must be in [0, 1], got {self.sparsity}")
        for name, value in self.overrides.items():
            if not 0.0 <= value <= 1.0:
                raise ActsparseError(f"{where}: sparsity for {name!r} must be in [0, 1], got {value}")
        if self.overrides and (self.method != "magnitude" or self.scope != "layer"):
            raise ActsparseError(f"{where}: overrides set a sparsity per layer: they need method=magnitude, scope=layer")
        if self.m < 1 or not 0 <= self.n <= self.m:
            raise ActsparseError(f"{where}: N:M needs 0 <= n <= m and m >= 1, got n={self.n}, m={self.m}")


@register
class PrunePass(ActsparsePass):
    """Prune linear-layer weights to zero: unstructured magnitude (layer/global) or N:M along K."""

    name = "prune"
    exact = False
    Options = PruneOptions

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        opts = self.options
        linears = [l for l in find_linears(model) if np.issubdtype(l.weight_array().dtype, np.floating)]
        if not linears:
            raise ActsparseError("pass 'prune': no linear layer with a constant float weight to prune")
        skipped = []
        if opts.method == "nm":
            kept = []
            for linear in linears:
                if linear.in_features % opts.m:
                    skipped.append({"name": linear.name, "reason": f"in_features {linear.in_features} "
                                                                   f"not a multiple of m={opts.m}"})
                else:
                    kept.append(linear)
            linears = kept
            masks = [nm_mask(l.weight_array("KN"), opts.n, opts.m) for l in linears]
        elif opts.scope == "global":
            masks = global_magnitude_masks([l.weight_array("KN") for l in linears], opts.sparsity)
        else:
            sparsity_of = apply_overrides(self.name, opts.overrides, {l.name: opts.sparsity for l in linears},
                                          {l.name: {l.name} for l in linears}, model, noun="prunable linear")
            masks = [magnitude_mask(l.weight_array("KN"), sparsity_of[l.name]) for l in linears]
        layers, copied = [], 0
        for linear, mask in zip(linears, masks):
            copied += _write_pruned(model, linear, mask)
            layers.append({"name": linear.name, "sparsity": round(1.0 - float(mask.mean()), 4),
                           "zeros": int(mask.size - mask.sum()), "weights": int(mask.size)})
        model = common.RemoveUnusedNodesPass()(model).model
        total = sum(l["weights"] for l in layers) or 1
        self.report = {
            "method": opts.method,
            "sparsity_reached": round(sum(l["zeros"] for l in layers) / total, 4),
            "copied_shared_weights": copied, "layers": layers, "skipped": skipped,
        }
        return ir.passes.PassResult(model, modified=bool(layers))


def magnitude_mask(w: np.ndarray, sparsity: float) -> np.ndarray:
    """Keep-mask dropping the `sparsity` fraction of entries with the smallest |w| (ties: by position)."""
    drop = int(round(sparsity * w.size))
    keep = np.ones(w.size, dtype=bool)
    if drop:
        keep[np.argsort(np.abs(w), axis=None, kind="stable")[:drop]] = False
    return keep.reshape(w.shape)


def global_magnitude_masks(weights: list[np.ndarray], sparsity: float) -> list[np.ndarray]:
    """One magnitude threshold over all weights together: layers end up with different sparsities."""
    flat = np.concatenate([np.abs(w).ravel() for w in weights])
    drop = int(round(sparsity * flat.size))
    keep = np.ones(flat.size, dtype=bool)
    if drop:
        keep[np.argsort(flat, kind="stable")[:drop]] = False
    masks, start = [], 0
    for w in weights:
        masks.append(keep[start:start + w.size].reshape(w.shape))
        start += w.size
    return masks


def nm_mask(w_kn: np.ndarray, n: int, m: int) -> np.ndarray:
    """Keep-mask with the n largest |w| in each run of m consecutive rows (K) of each column."""
    k, cols = w_kn.shape
    if k % m:
        raise ActsparseError(f"N:M pruning needs in_features divisible by m={m}, got {k}")
    groups = np.abs(w_kn).reshape(k // m, m, cols)
    order = np.argsort(-groups, axis=1, kind="stable")  # largest first
    keep = np.zeros_like(groups, dtype=bool)
    np.put_along_axis(keep, order[:, :n, :], True, axis=1)
    return keep.reshape(k, cols)


def _write_pruned(model: ir.Model, linear: Linear, mask_kn: np.ndarray) -> int:
    """Zero the weight in place; a shared weight is copied first. Returns 1 if it was copied."""
    stored = ir.convenience.get_const_tensor(linear.weight).numpy()
    mask = mask_kn if linear.weight_layout == "KN" else mask_kn.T
    pruned = np.where(mask, stored, np.zeros((), stored.dtype))
    if linear.weight_shared:
        copy = add_initializer(model, f"{linear.weight.name}.pruned", pruned)
        reader = linear.weight_nodes[0] if linear.weight_nodes else linear.node
        for index, value in enumerate(reader.inputs):
            if value is linear.weight:
                reader.replace_input_with(index, copy)
        return 1
    linear.weight.const_value = ir.tensor(pruned, name=linear.weight.name)
    producer = linear.weight.producer()
    if producer is not None and producer.op_type == "Constant":  # keep a Constant node's value in step
        producer.attributes["value"] = ir.AttrTensor("value", linear.weight.const_value)
    return 0
