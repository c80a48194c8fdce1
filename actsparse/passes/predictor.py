"""predictor: learned prediction of the active FFN neurons (Deja Vu / PowerInfer style).

Before: y = down(h),            h = act(gate(x)) * up(x)   (or act(up(x)))
After:  y = down(h * m),        m = actsparse.PredictActive(x, A, B, b, t)       (mode=threshold)
                                m = actsparse.PredictActiveTopK(x, A, B, b, k)   (mode=topk)
                                m = actsparse.PredictActiveStat(x, A, B, b, z)   (mode=statistical)

Per FFN block a low-rank predictor reads the block's input x: logits = (x @ A) @ B + b with
A: [D, r], B: [r, F]; m is 1 for the neurons predicted active, else 0. The predictor is trained
(torch, full batch, class-balanced logistic loss) on calibration activations, with the labels
h != 0: the model should be ReLU-family first (relufy, actsparse.train.relufy), where most
of h is exactly zero. Selecting the predicted neurons:
- threshold: logits > t, t calibrated per layer for `recall` of the active neurons;
- topk: the k = round(active * F) largest logits per token;
- statistical (Spark Transformer's statistical top-k): logits > mean + z * std over the
  neurons of the token, z = the normal quantile of 1 - active (no sort, no TopK).
m feeds the sparse FFN path: a kernel computes gate/up/down only for the neurons m keeps
(codegen's ffn_indexed). Approximate: neurons predicted inactive are dropped even when active
(recall < 1). The report gives, per layer, recall, precision and the predicted-active fraction
on the calibration samples (first `train_fraction` trained on, the rest held out).
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import NormalDist
from typing import Literal

import numpy as np
import onnx_ir as ir

from actsparse.calibrate.stats import as_rows, collect_values
from actsparse.errors import ActsparseError
from actsparse.ir.blocks import FFNBlock, find_blocks
from actsparse.ir.custom_ops import (DOMAIN, PREDICTOR_OPS, add_initializer, ensure_function, unique_name,
                                     unique_node_name)
from actsparse.passes.base import ActsparsePass, option, register

OPS = PREDICTOR_OPS


@dataclass
class PredictorOptions:
    """Options of `predictor` (approximate).

    Attributes:
        mode: how predicted neurons are chosen: "threshold" (default), "topk" or "statistical".
        rank: rank r of the predictor x -> r -> F (default 32; >= 1).
        recall: threshold mode: fraction of active neurons kept on calibration rows (default 0.97; (0, 1]).
        active: topk/statistical: fraction of the F neurons kept per token (default 0.3; (0, 1]).
        steps: full-batch Adam steps of training per layer (default 400; >= 1).
        lr: the learning rate (default 0.01).
        train_fraction: calibration samples trained on; the rest measure recall and precision
            (default 0.75; (0, 1]).
    """
    mode: Literal["threshold", "topk", "statistical"] = option("threshold", "how predicted neurons are chosen")
    rank: int = option(32, "rank r of the predictor x -> r -> F")
    recall: float = option(0.97, "threshold mode: fraction of active neurons kept on the calibration rows")
    active: float = option(0.3, "topk/statistical: fraction of the F neurons kept per token")
    steps: int = option(400, "full-batch Adam steps of predictor training per layer")
    lr: float = option(1e-2, "predictor learning rate")
    train_fraction: float = option(0.75, "calibration samples trained on; the rest measure recall/precision")

    def validate(self) -> None:
        if self.rank < 1:
            raise ActsparseError("pass 'predictor': rank must be >= 1")
        for name in ("recall", "active", "train_fraction"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ActsparseError(f"pass 'predictor': {name} must be in (0, 1]")
        if self.steps < 1:
            raise ActsparseError("pass 'predictor': steps must be >= 1")


@register
class PredictorPass(ActsparsePass):
    """Insert a trained low-rank predictor of the active FFN neurons; mask the FFN hidden with it."""

    name = "predictor"
    exact = False
    Options = PredictorOptions

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        blocks = find_blocks(model).ffn
        if not blocks:
            raise ActsparseError("pass 'predictor': no FFN blocks found")
        samples = self.context.require_calibration(self.name)
        if len(samples) < 2:
            raise ActsparseError("pass 'predictor': needs at least 2 calibration samples (train + held out)")
        names = [n for b in blocks for n in (_block_input(b).name, b.hidden.name)]
        values = collect_values(model, names, samples, on_sample=self.context.on_sample)
        split = min(len(samples) - 1, max(1, int(round(len(samples) * self.options.train_fraction))))
        layers = []
        for block in blocks:
            x_all, h_all = values[_block_input(block).name], values[block.hidden.name]
            d, f = block.up.in_features, block.down.in_features
            x_train, h_train = as_rows(x_all[:split], d), as_rows(h_all[:split], f)
            x_test, h_test = as_rows(x_all[split:], d), as_rows(h_all[split:], f)
            active_fraction = float(np.mean(h_train != 0))
            if active_fraction > 0.95:
                raise ActsparseError(f"pass 'predictor': FFN {block.name!r} has {active_fraction:.0%} nonzero hidden "
                                     "values; make it ReLU-family first (relufy)")
            a, b, bias = train_predictor(x_train, h_train != 0, self.options.rank, self.options.steps,
                                         self.options.lr, self.context.seed)
            param = self._selection_parameter(x_train @ a @ b + bias, h_train != 0)
            mask_test = select(x_test @ a @ b + bias, self.options.mode, param)
            layers.append({"name": block.name, "d": d, "f": f, "rank": self.options.rank,
                           "true_active": round(float(np.mean(h_test != 0)), 4),
                           **_quality(mask_test, h_test != 0), "parameter": float(param)})
            _insert(model, block, a, b, bias, self.options.mode, param)
        self.report = {"mode": self.options.mode, "layers": layers,
                       "recall_mean": round(float(np.mean([l["recall"] for l in layers])), 4),
                       "predicted_active_mean": round(float(np.mean([l["predicted_active"] for l in layers])), 4)}
        return ir.passes.PassResult(model, modified=True)

    def _selection_parameter(self, logits: np.ndarray, labels: np.ndarray) -> float:
        if self.options.mode == "threshold":
            return threshold_for_recall(logits, labels, self.options.recall)
        if self.options.mode == "topk":
            return float(max(1, int(round(self.options.active * logits.shape[-1]))))
        return NormalDist().inv_cdf(1.0 - self.options.active) if self.options.active < 1 else -1e4


def _block_input(block: FFNBlock) -> ir.Value:
    return (block.gate or block.up).input


def train_predictor(x: np.ndarray, labels: np.ndarray, rank: int, steps: int, lr: float, seed: int = 0):
    """Fit logits = (x @ A) @ B + b to `labels` ([n, F] bool) with a class-balanced logistic loss
    (active neurons weigh as much in total as inactive ones: recall matters most).
    Returns (A [D, r], B [r, F], b [F]) as float32."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    yt = torch.from_numpy(labels.astype(np.float32))
    d, f = x.shape[1], labels.shape[1]
    a = torch.nn.Parameter(torch.randn(d, rank, generator=generator) / np.sqrt(d))
    b = torch.nn.Parameter(torch.randn(rank, f, generator=generator) / np.sqrt(rank))
    positive = yt.mean(0).clamp(1e-3, 1 - 1e-3)
    bias = torch.nn.Parameter(torch.log(positive / (1 - positive)))
    pos_weight = ((1 - yt.mean()) / yt.mean().clamp_min(1e-3)).clamp(1.0, 100.0)
    optimizer = torch.optim.Adam([a, b, bias], lr=lr)
    scale = xt.std().clamp_min(1e-6)
    for _ in range(steps):
        logits = (xt / scale) @ a @ b + bias
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, yt, pos_weight=pos_weight)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return ((a / scale).numpy().astype(np.float32), b.detach().numpy().astype(np.float32),
                bias.detach().numpy().astype(np.float32))


def threshold_for_recall(logits: np.ndarray, labels: np.ndarray, recall: float) -> float:
    """The largest logit threshold that keeps `recall` of the active entries."""
    active_logits = logits[labels]
    if active_logits.size == 0:
        return float(np.max(logits)) + 1.0
    cut = np.quantile(active_logits.astype(np.float32), 1.0 - recall, method="lower")  # an actual logit: kept
    return float(np.nextafter(np.float32(cut), np.float32(-np.inf)))


def select(logits: np.ndarray, mode: str, param: float) -> np.ndarray:
    """The numpy reference of the three ONNX ops: a boolean mask of predicted-active neurons."""
    if mode == "threshold":
        return logits > param
    if mode == "topk":
        k = int(param)
        kth = -np.partition(-logits, k - 1, axis=-1)[..., k - 1:k]
        return logits >= kth
    mean = logits.mean(-1, keepdims=True)
    std = np.sqrt(((logits - mean) ** 2).mean(-1, keepdims=True))
    return logits > mean + param * std


def _quality(predicted: np.ndarray, active: np.ndarray) -> dict:
    hits = float(np.sum(predicted & active))
    return {"recall": round(hits / max(1.0, float(active.sum())), 4),
            "precision": round(hits / max(1.0, float(predicted.sum())), 4),
            "predicted_active": round(float(predicted.mean()), 4)}


# ---------------------------------------------------------------------------------- ONNX

def _insert(model: ir.Model, block: FFNBlock, a, b, bias, mode: str, param: float) -> None:
    op = OPS[mode]
    ensure_function(model, op)
    x, hidden = _block_input(block), block.hidden
    dtype = hidden.dtype.numpy() if hidden.dtype is not None else np.float32
    base = block.name
    values = [add_initializer(model, f"{base}.predictor.{n}", arr.astype(dtype)) for n, arr in
              (("a", a), ("b", b), ("bias", bias))]
    param_array = np.array([int(param)], np.int64) if mode == "topk" else np.array(param, dtype=dtype)
    values.append(add_initializer(model, f"{base}.predictor.{'k' if mode == 'topk' else 'param'}", param_array))
    predict = ir.Node(DOMAIN, op, [x, *values], name=unique_node_name(model, f"{base}.predict_active"))
    mask = predict.outputs[0]
    mask.name = unique_name(model, f"{base}.predicted_mask")
    mask.type, mask.shape = hidden.type, hidden.shape
    apply = ir.Node("", "Mul", [hidden, mask], name=unique_node_name(model, f"{base}.apply_predicted_mask"))
    masked = apply.outputs[0]
    masked.name = unique_name(model, f"{hidden.name}_predicted")
    masked.type, masked.shape = hidden.type, hidden.shape
    model.graph.insert_after(hidden.producer(), [predict, apply])
    down = block.down.node
    for index, value in enumerate(down.inputs):
        if value is hidden:
            down.replace_input_with(index, masked)
