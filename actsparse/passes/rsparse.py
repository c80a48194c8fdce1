"""rsparse: R-Sparse, rank-aware activation sparsity (Zhang et al., 2025), training-free.

Before: y = x @ W                                            (MatMul, or Gemm with a bias)
After:  y = actsparse.RankSparseMatMul(x, t, s, W, A, B)
          = (x where keep) @ W  +  ((x where not keep) @ A) @ B,     keep_k = |x_k| * s_k > t

The input channels that matter are computed exactly, from whole weight rows (what a sparse-input
kernel reads); the rest still reach y, through a rank-r approximation of W. A = U_r Σ_r [K, r] and
B = V_rᵀ [r, N] come from the SVD W = U Σ Vᵀ at optimize time; s_k = ‖W[k, :]‖, the norm of the
weight row channel k reads (it equals ‖(U Σ)[k, :]‖, the scale of the paper's implementation).

Budget. `sparsity` is the fraction of each linear's weight bytes NOT read per token, so R-Sparse
at 50 % reads as many bytes as TEAL at 50 %: (1 - sparsity) K N floats. The share `sparse_ratio`
(α) of that budget goes to the rows of kept channels (the threshold keeps (1 - sparsity) α of
the channels on the calibration tokens), the rest to the rank:
r = floor((1 - sparsity) (1 - α) K N / (K + N)), since A and B hold r (K + N) floats.

α per linear: with `sparse_ratio=none` (the default) each linear takes the α of a grid (0, 0.1,
.., 1) that minimizes its own relative output error on the calibration tokens (the paper runs an
evolutionary search over whole-model loss instead). The rows kept are exact, so the error is the
dropped part's, and with the paper's SVD of W it has a closed form: with D = x where not keep,
‖D W - D A B‖² = Σ_{j >= r} ‖D (U Σ)[:, j]‖² (the rows of Vᵀ are orthonormal).
`basis=activation` (an actsparse extension, not the paper's) fits A and B to the dropped inputs
themselves instead: the best rank-r fit of D W under a small ridge (see `activation_factors`).
A linear whose rank comes out 0 gets a plain SparsifyWeighted (WINA's op) instead.
`allocation=greedy|evolutionary` gives each linear its own sparsity at the same total bytes read,
searched on the model's output (passes/rsparse_allocation.py); the default, uniform, does not.
Approximate: the pipeline reports the cost.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common

from actsparse.calibrate.stats import as_rows, collect_values, token_masks
from actsparse.errors import ActsparseError
from actsparse.ir.blocks import Linear, find_blocks, find_linears
from actsparse.ir.custom_ops import (DOMAIN, RANK_SPARSE_MATMUL, add_initializer, ensure_function, insert_sparsify,
                                     unique_name, unique_node_name)
from actsparse.passes.base import ActsparsePass, option, register

SPARSE_RATIOS = np.round(np.linspace(0.0, 1.0, 11), 2)  # the α grid searched per linear
MAX_ROWS = 2048  # calibration tokens used per linear (the search is a few matmuls of this many rows)
DROP_ALL = np.float32(np.finfo(np.float32).max)  # threshold when α = 0: every channel goes to the rank
# basis=activation: λ = RIDGE * K / tokens of the mean input power. Shrinkage that fades as calibration
# tokens outnumber channels: MiniLM's 24 sentences give fewer tokens than its down projection's
# 1,536 channels, and a fixed 0.05 over-fitted there (cosine 0.873 at 50 % FFN; 0.961 now); on the
# mini LM (2,048 tokens, K <= 384) it is as before (docs/rsparse.md).
RIDGE = 0.5


@dataclass
class RSparseOptions:
    """Options of `rsparse` (approximate).

    Attributes:
        sparsity: fraction of each linear's weight bytes not read per token (default 0.5; [0, 1)).
        sparse_ratio: share of the read budget spent on whole rows of kept channels, the rest on
            the low rank (0..1; default None: searched per linear).
        scope: which linear inputs: "down", "ffn" (default), "attention", "all" or "linears".
        basis: the low-rank factors: "weight" (default: SVD of W) or "activation" (fitted to
            the dropped inputs).
        allocation: per-linear sparsity at the same total bytes read: "uniform" (default: every
            linear at `sparsity`), "greedy" or "evolutionary" (passes/rsparse_allocation.py).
    """
    sparsity: float = option(0.5, "fraction of each linear's weight bytes not read per token (0..1)")
    sparse_ratio: float | None = option(None, "share of the read budget spent on whole rows of kept channels "
                                              "(the rest: rank); none: searched per linear")
    scope: Literal["down", "ffn", "attention", "all", "linears"] = option(
        "ffn", "down: FFN down inputs; ffn: FFN inputs; attention: q/k/v/o; all: ffn+attention; linears: every linear")
    basis: Literal["weight", "activation"] = option(
        "weight", "low-rank factors: weight = SVD of W (the paper); activation = fitted to the dropped inputs")
    allocation: Literal["uniform", "greedy", "evolutionary"] = option(
        "uniform", "per-linear sparsity at the same bytes read: uniform, greedy (closed-form errors x measured "
                   "sensitivity) or evolutionary (model-output error on calibration samples)")

    def validate(self) -> None:
        if not 0.0 <= self.sparsity < 1.0:
            raise ActsparseError(f"pass 'rsparse': sparsity must be in [0, 1), got {self.sparsity}")
        if self.sparse_ratio is not None and not 0.0 <= self.sparse_ratio <= 1.0:
            raise ActsparseError(f"pass 'rsparse': sparse_ratio must be in [0, 1] or none, got {self.sparse_ratio}")
        if self.allocation != "uniform" and (self.sparse_ratio is not None or self.basis != "weight"):
            raise ActsparseError(f"pass 'rsparse': allocation={self.allocation} searches the split itself from W's "
                                 "SVD: it needs sparse_ratio=none and basis=weight")


@dataclass
class Split:
    """One linear's sparse/low-rank split: keep the channels whose score exceeds `threshold`."""

    sparse_ratio: float
    rank: int
    threshold: float
    kept: float  # fraction of calibration scores above the threshold
    error: float  # relative output error on the calibration tokens
    lowrank_in: np.ndarray | None = None  # A [K, rank]
    lowrank_out: np.ndarray | None = None  # B [rank, N]


@register
class RSparsePass(ActsparsePass):
    """R-Sparse: exact rows for significant input channels, a low-rank weight for the rest."""

    name = "rsparse"
    exact = False
    Options = RSparseOptions

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        linears = [l for l in linears_in_scope(model, self.options.scope) if l.plain_product]
        if not linears:
            raise ActsparseError(f"pass 'rsparse': no {self.options.scope!r} linear layers found")
        samples = self.context.require_calibration(self.name)
        inputs = list(dict.fromkeys(l.input.name for l in linears))
        values = collect_values(model, inputs, samples)
        masks = token_masks(samples)
        all_linear_bytes = sum(l.in_features * l.out_features * 4 for l in find_linears(model)) or 1
        layers, search = [], {}
        if self.options.sparsity == 0:  # nothing to skip: the linears stay dense
            layers = [_layer_report(l, 0.0, Split(1.0, 0, -1.0, 1.0, 0.0)) for l in linears]
        elif self.options.allocation == "uniform":
            for linear in linears:
                rows = _calibration_rows(as_rows(values[linear.input.name], linear.in_features, masks))
                weight = linear.weight_array("KN").astype(np.float64)
                split = choose_split(rows, weight, self.options.sparsity, self.options.sparse_ratio, self.options.basis)
                _rewrite(model, linear, weight, split)
                layers.append(_layer_report(linear, self.options.sparsity, split))
        else:
            layers, search = self._allocated(model, linears, values, masks, samples)
        for cleanup in (common.RemoveUnusedNodesPass(), common.RemoveUnusedOpsetsPass()):
            model = cleanup(model).model
        self.report = _summary(layers, all_linear_bytes) | {"allocation": self.options.allocation, "layers": layers}
        if search:
            self.report["search"] = search
        return ir.passes.PassResult(model, modified=self.options.sparsity > 0)

    def _allocated(self, model, linears, values, masks, samples) -> tuple[list[dict], dict]:
        """Per-linear sparsity at the uniform budget, searched over the closed-form error curves."""
        from actsparse.passes.rsparse_allocation import allocate, linear_curve  # it imports this module

        names = [l.name for l in linears]
        if len(set(names)) != len(names):
            raise ActsparseError("pass 'rsparse': allocation needs distinct linear names")
        weights = {l.name: l.weight_array("KN").astype(np.float64) for l in linears}
        curves = [linear_curve(l.name, _calibration_rows(as_rows(values[l.input.name], l.in_features, masks)),
                               weights[l.name]) for l in linears]
        targets, search = allocate(model, self.options.scope, curves, self.options.sparsity,
                                   self.options.allocation, samples)
        layers = []
        for linear, curve in zip(linears, curves):
            split = curve.split(targets[linear.name])
            _rewrite(model, linear, weights[linear.name], split)
            layers.append(_layer_report(linear, targets[linear.name], split))
        return layers, search


def linears_in_scope(model: ir.Model, scope: str) -> list[Linear]:
    """The linears `scope` names, each once (a fused qkv linear is q, k and v at once)."""
    blocks = find_blocks(model)
    if scope == "linears":
        return list(blocks.linears)
    linears: list[Linear] = []
    if scope in ("down", "ffn", "all"):
        for block in blocks.ffn:
            linears += [block.down] if scope == "down" else [l for l in (block.gate, block.up, block.down) if l]
    if scope in ("attention", "all"):
        for block in blocks.attention:
            linears += [l for l in (block.q, block.k, block.v, block.o) if l]
    unique = {id(l.node): l for l in linears}
    return list(unique.values())


def _calibration_rows(rows: np.ndarray) -> np.ndarray:
    if len(rows) <= MAX_ROWS:
        return rows.astype(np.float64)
    pick = np.random.default_rng(0).choice(len(rows), MAX_ROWS, replace=False)
    return rows[np.sort(pick)].astype(np.float64)


def rank_for(sparsity: float, sparse_ratio: float, k: int, n: int) -> int:
    """The rank the low-rank share of the budget pays for, at most min(K, N)."""
    return int(min(np.floor((1 - sparsity) * (1 - sparse_ratio) * k * n / (k + n) + 1e-9), min(k, n)))


def channel_scale(weight_kn: np.ndarray) -> np.ndarray:
    """‖W[k, :]‖ per input channel k."""
    return np.sqrt(np.sum(np.square(weight_kn, dtype=np.float64), axis=1))


def choose_split(rows: np.ndarray, weight_kn: np.ndarray, sparsity: float, sparse_ratio: float | None,
                 basis: str = "weight") -> Split:
    """The split of one linear: the given α, or the α of the grid with the smallest output error
    on `rows` (calibration tokens), with its low-rank factors."""
    k, n = weight_kn.shape
    svd = np.linalg.svd(weight_kn, full_matrices=False) if basis == "weight" else None
    scores = np.abs(rows) * channel_scale(weight_kn)
    reference = float(np.sum((rows @ weight_kn) ** 2)) or 1.0
    candidates = [sparse_ratio] if sparse_ratio is not None else list(SPARSE_RATIOS)
    best = None
    for ratio in candidates:
        threshold = _threshold(scores, 1 - (1 - sparsity) * ratio)
        dropped = np.where(scores > threshold, 0.0, rows)
        rank = rank_for(sparsity, ratio, k, n)
        if svd is not None:  # ‖D W - D A B‖² = Σ_{j >= r} ‖D (U Σ)[:, j]‖²: Vᵀ's rows are orthonormal
            u, s, vt = svd
            error = float(np.sum((dropped @ (u[:, rank:] * s[rank:])) ** 2))
            a, b = u[:, :rank] * s[:rank], vt[:rank]
        else:
            a, b, error = activation_factors(dropped, weight_kn, rank)
        split = Split(float(ratio), rank, threshold, float(np.mean(scores > threshold)), error / reference, a, b)
        if best is None or split.error < best.error - 1e-12:
            best = split
    return best


def _threshold(scores: np.ndarray, dropped_fraction: float) -> float:
    if dropped_fraction <= 0:
        return -1.0
    if dropped_fraction >= 1:
        return float(DROP_ALL)
    return float(np.quantile(scores, dropped_fraction))


def activation_factors(dropped: np.ndarray, weight_kn: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, float]:
    """A [K, r], B [r, N] minimizing ‖D W - D A B‖² + λ‖W - A B‖² over the dropped inputs D: with
    DᵀD + λI = RᵀR, the best rank-r approximation of R W, mapped back through R⁻¹; and that
    minimum, Σ_{j >= r} σ_j(R W)² (an upper bound of the error on D alone). λ = RIDGE * K / rows
    times the mean input power: the fewer calibration rows per channel, the closer to W's own SVD."""
    rows, k = dropped.shape[0], weight_kn.shape[0]
    covariance = dropped.T @ dropped
    covariance += np.eye(k) * (RIDGE * k / max(rows, 1) * np.trace(covariance) / k + 1e-12)
    upper = np.linalg.cholesky(covariance).T
    u, s, vt = np.linalg.svd(upper @ weight_kn, full_matrices=False)
    return np.linalg.solve(upper, u[:, :rank] * s[:rank]), vt[:rank], float(np.sum(s[rank:] ** 2))


def _rewrite(model: ir.Model, linear: Linear, weight_kn: np.ndarray, split: Split) -> None:
    x = linear.node.inputs[0]  # not linear.input: a linear rewritten before may have produced it
    x_dtype = (x.dtype or ir.DataType.FLOAT).numpy()
    w_dtype = ir.convenience.get_const_tensor(linear.weight).dtype.numpy()
    base = linear.name or "linear"
    threshold = add_initializer(model, f"{base}.rsparse_threshold", np.array(split.threshold, dtype=x_dtype))
    if split.rank == 0:  # all of the budget on rows: a plain weighted threshold (WINA's op)
        scale = add_initializer(model, f"{base}.rsparse_scale", channel_scale(weight_kn).astype(x_dtype))
        sparse = insert_sparsify(model, x, threshold, scale, name=f"{base}.rsparse")
        linear.node.replace_input_with(0, sparse)
        return
    a = add_initializer(model, f"{base}.rsparse_lowrank_in", split.lowrank_in.astype(w_dtype))
    b = add_initializer(model, f"{base}.rsparse_lowrank_out", split.lowrank_out.astype(w_dtype))
    insert_rank_sparse(model, linear, threshold, a, b, weight_kn)


def insert_rank_sparse(model: ir.Model, linear: Linear, threshold: ir.Value, a: ir.Value, b: ir.Value,
                       weight_kn: np.ndarray | None = None) -> None:
    """Replace `linear` by RankSparseMatMul(x, threshold, ‖W[k, :]‖, W, a, b) (+ its bias)."""
    x = linear.node.inputs[0]
    x_dtype = (x.dtype or ir.DataType.FLOAT).numpy()
    w_dtype = ir.convenience.get_const_tensor(linear.weight).dtype.numpy()
    base = linear.name or "linear"
    weight_kn = linear.weight_array("KN").astype(np.float64) if weight_kn is None else weight_kn
    scale = add_initializer(model, f"{base}.rsparse_scale", channel_scale(weight_kn).astype(x_dtype))
    ensure_function(model, RANK_SPARSE_MATMUL)
    if linear.node.op_type == "MatMul" and linear.weight_layout == "KN" and not linear.weight_nodes:
        weight = linear.weight  # the model's own tensor: no copy
    else:
        weight = add_initializer(model, f"{base}.weight_kn", weight_kn.astype(w_dtype))
    inputs = [x, threshold, scale, weight, a, b]
    node = ir.Node(DOMAIN, RANK_SPARSE_MATMUL, inputs, name=unique_node_name(model, f"{base}.rsparse"))
    product = linear.node.outputs[0]
    result = node.outputs[0]
    result.name = unique_name(model, f"{product.name}_rsparse")
    result.type, result.shape = product.type, product.shape
    model.graph.insert_before(linear.node, node)
    if linear.node.op_type == "Gemm" and len(linear.node.inputs) > 2 and linear.node.inputs[2] is not None:
        add = ir.Node("", "Add", [result, linear.node.inputs[2]], name=unique_node_name(model, f"{base}.bias"))
        add.outputs[0].type, add.outputs[0].shape = product.type, product.shape
        add.outputs[0].name = unique_name(model, f"{product.name}_biased")
        model.graph.insert_before(linear.node, add)
        result = add.outputs[0]
    name = product.name if product.is_graph_output() else None
    ir.convenience.replace_all_uses_with(product, result, replace_graph_outputs=True)
    if name:  # the model keeps its output names
        product.name, result.name = f"{name}.replaced", name


def _layer_report(linear: Linear, sparsity: float, split: Split) -> dict:
    k, n = linear.in_features, linear.out_features
    read = (split.kept * k * n + split.rank * (k + n)) / (k * n)
    return {"name": linear.name, "shape": [k, n], "target": sparsity, "sparse_ratio": split.sparse_ratio,
            "rank": split.rank, "threshold": split.threshold, "calibrated_kept": round(split.kept, 4),
            "read_fraction": round(read, 4), "relative_error": round(split.error, 6), "weight_bytes": k * n * 4}


def _summary(layers: list[dict], all_linear_bytes: int) -> dict:
    sparsified = sum(l["weight_bytes"] for l in layers) or 1
    skipped = sum((1 - l["read_fraction"]) * l["weight_bytes"] for l in layers)
    return {
        "sparsity_weighted": round(sum(l["target"] * l["weight_bytes"] for l in layers) / sparsified, 4),
        "calibrated_read_fraction": round(1 - skipped / sparsified, 4),
        "skippable_weight_fraction": round(skipped / all_linear_bytes, 4),
        "sparse_ratio_mean": round(float(np.mean([l["sparse_ratio"] for l in layers])), 4),
    }
