"""measure: per-layer activation sparsity on the calibration set (the graph is unchanged).

Before: a model.
After:  the same model; the report lists, for every linear layer, the fraction of its input
        entries with |x| <= eps, and the fraction of all linear weight bytes that a sparse
        kernel would skip (sum over layers of sparsity x weight bytes / total).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from actsparse.calibrate.stats import as_rows, collect_values
from actsparse.errors import ActsparseError
from actsparse.ir.blocks import find_linears
from actsparse.passes.base import ActsparsePass, option, register


@dataclass
class MeasureOptions:
    """Options of `measure` (exact: only measures).

    Attributes:
        eps: an entry with |x| <= eps counts as zero (default 0.0; >= 0).
    """
    eps: float = option(0.0, "entries with |x| <= eps count as zero")

    def validate(self) -> None:
        if self.eps < 0:
            raise ActsparseError("pass 'measure': eps must be >= 0")


@register
class MeasurePass(ActsparsePass):
    """Report activation sparsity per linear layer and the weight bytes a sparse kernel skips."""

    name = "measure"
    exact = True
    Options = MeasureOptions

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.report = measure_sparsity(model, self.context.require_calibration(self.name), self.options.eps,
                                       on_sample=self.context.on_sample)
        return ir.passes.PassResult(model, modified=False)


def measure_sparsity(model: ir.Model, samples, eps: float = 0.0, on_sample=None) -> dict:
    linears = find_linears(model)
    if not linears:
        return {"layers": [], "skippable_weight_fraction": 0.0, "linears": 0}
    values = collect_values(model, list(dict.fromkeys(l.input.name for l in linears)), samples, on_sample)
    layers, skipped, total = [], 0.0, 0
    for linear in linears:
        rows = as_rows(values[linear.input.name], linear.in_features)
        sparsity = float(np.mean(np.abs(rows) <= eps))
        weight_bytes = linear.in_features * linear.out_features * 4
        skipped += sparsity * weight_bytes
        total += weight_bytes
        layers.append({"name": linear.name, "shape": [linear.in_features, linear.out_features],
                       "sparsity": round(sparsity, 4), "weight_bytes": weight_bytes})
    return {
        "linears": len(layers),
        "mean_sparsity": round(float(np.mean([l["sparsity"] for l in layers])), 4),
        "skippable_weight_fraction": round(skipped / total, 4),
        "layers": layers,
    }
