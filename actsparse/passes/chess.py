"""chess: CHESS channel-wise thresholds on the FFN activation (Zhang et al., 2024).

Before: h = act(gate(x)) * up(x)                (gated)   or  h = act(up(x))  (mlp)
After:  a = act(gate(x));  a' = actsparse.SparsifyWeighted(a, 1, 1 / t)
        h = a' * up(x)                                     or  h = a'

CATS uses one threshold per layer on |act(gate)|; CHESS one per channel: t_i is the
`sparsity`-quantile of |a_i| over the calibration tokens, so every neuron is dropped on the
same fraction of tokens, and neurons whose activations are large keep a large cut-off. Keeping
|a_i| > t_i is keeping |a_i| * (1 / t_i) > 1: the existing SparsifyWeighted op (WINA's,
with its kernels) carries it, the channel scale being 1 / t_i and the threshold 1.
A dropped neuron needs neither its up row nor its down row. Approximate: the pipeline
reports the cost.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common

from actsparse.calibrate.stats import as_rows, collect_values, token_masks
from actsparse.errors import ActsparseError
from actsparse.ir.blocks import find_blocks
from actsparse.ir.custom_ops import add_initializer, insert_sparsify
from actsparse.passes.base import ActsparsePass, option, register
from actsparse.passes.overrides import apply_overrides, overrides_option

MIN_THRESHOLD = 1e-12  # a channel that is (almost) always zero: 1/t stays finite


@dataclass
class ChessOptions:
    """Options of `chess` (approximate).

    Attributes:
        sparsity: fraction of each FFN channel's calibration activations dropped (default 0.5; [0, 1)).
        overrides: per-FFN-block sparsity ([0, 1)) by block or linear name (passes/overrides.py).
    """
    sparsity: float = option(0.5, "fraction of each channel's activations dropped on the calibration set")
    overrides: dict[str, float] = overrides_option("sparsity")

    def validate(self) -> None:
        for name, value in [("sparsity", self.sparsity), *self.overrides.items()]:
            if not 0.0 <= value < 1.0:
                raise ActsparseError(f"pass 'chess': sparsity for {name!r} must be in [0, 1), got {value}")


@register
class ChessPass(ActsparsePass):
    """Channel-wise calibrated thresholds on FFN activations (CHESS)."""

    name = "chess"
    exact = False
    Options = ChessOptions

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        blocks = find_blocks(model).ffn
        if not blocks:
            raise ActsparseError("pass 'chess': no FFN blocks found")
        sparsity_of = apply_overrides(self.name, self.options.overrides, {b.name: self.options.sparsity for b in blocks},
                                      {b.name: {l.name for l in b.linears} for b in blocks}, model, noun="FFN block")
        samples = self.context.require_calibration(self.name)
        outputs = [b.activation.output for b in blocks]
        values = collect_values(model, [v.name for v in outputs], samples, on_sample=self.context.on_sample)
        masks = token_masks(samples)
        layers = []
        for block, act in zip(blocks, outputs):
            sparsity = sparsity_of[block.name]
            channels = block.down.in_features
            rows = np.abs(as_rows(values[act.name], channels, masks))
            thresholds = channel_thresholds(rows, sparsity)
            dropped = float(np.mean(rows <= thresholds)) if sparsity > 0 else 0.0
            if sparsity > 0:
                _insert(model, block, act, thresholds)
            layers.append({"name": block.name, "target": sparsity, "calibrated_sparsity": round(dropped, 4),
                           "threshold_min": float(thresholds.min()), "threshold_max": float(thresholds.max())})
        for cleanup in (common.RemoveUnusedNodesPass(), common.RemoveUnusedOpsetsPass()):
            model = cleanup(model).model
        self.report = {"sparsity_mean": round(float(np.mean([l["target"] for l in layers])), 4),
                       "calibrated_sparsity_mean": round(float(np.mean([l["calibrated_sparsity"] for l in layers])), 4),
                       "layers": layers}
        return ir.passes.PassResult(model, modified=any(l["target"] > 0 for l in layers))


def channel_thresholds(magnitudes: np.ndarray, sparsity: float) -> np.ndarray:
    """Per column of `magnitudes` ([tokens, channels]), its `sparsity`-quantile (-1 at 0: keep all)."""
    if sparsity <= 0:
        return np.full(magnitudes.shape[1], -1.0, np.float32)
    return np.quantile(magnitudes, sparsity, axis=0).astype(np.float32)


def _activation_dtype(block, act: ir.Value) -> np.dtype:
    """The activation's float type: its own when known, else its down linear's weight type (an
    fp16 model needs fp16 scales: onnxruntime refuses Mul(fp16, fp32))."""
    if act.dtype is not None:
        return act.dtype.numpy()
    weight = block.down.weight.const_value
    return weight.dtype.numpy() if weight is not None and weight.dtype.is_floating_point() else np.float32


def _insert(model: ir.Model, block, act: ir.Value, thresholds: np.ndarray) -> None:
    dtype = _activation_dtype(block, act)
    scale = (1.0 / np.maximum(thresholds, MIN_THRESHOLD)).astype(dtype)
    one = add_initializer(model, f"{block.name}.chess_threshold", np.array(1.0, dtype=dtype))
    scale_value = add_initializer(model, f"{block.name}.chess_channel_scale", scale)
    readers = list(act.uses())
    sparse = insert_sparsify(model, act, one, scale_value, name=f"{block.name}.chess")
    for use in readers:
        use.node.replace_input_with(use.idx, sparse)
