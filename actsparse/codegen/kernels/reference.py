"""numpy references for the hand-written kernels (the ground truth of their tests).

All take ONNX layouts: x [M, K], W [K, N]; FFN x [1, D], Wg/Wu [D, F], Wd [F, D].
"""

from __future__ import annotations

import numpy as np


def dense_matmul_reference(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """y = x @ W in float64, returned as float32."""
    return (x.astype(np.float64) @ w.astype(np.float64)).astype(np.float32)


def active_mask(x: np.ndarray, mode: str, threshold: float | None = None, scale: np.ndarray | None = None) -> np.ndarray:
    """Which x[m, k] count: ``nonzero`` x != 0; ``threshold`` |x| > t; ``scaled`` |x| * scale[k] > t."""
    if mode == "nonzero":
        return x != 0
    if mode == "threshold":
        return np.abs(x) > np.float32(threshold)
    if mode == "scaled":
        return np.abs(x) * scale.astype(np.float32) > np.float32(threshold)
    raise ValueError(f"unknown mode {mode!r}")


def sparse_matmul_reference(
    x: np.ndarray, w: np.ndarray, mode: str = "threshold", threshold: float | None = None, scale: np.ndarray | None = None
) -> np.ndarray:
    """y[m] = sum over active k of x[m, k] * W[k, :] (inactive inputs count as 0)."""
    return dense_matmul_reference(np.where(active_mask(x, mode, threshold, scale), x, 0), w)


def rank_sparse_matmul_reference(x: np.ndarray, threshold: float, scale: np.ndarray, w: np.ndarray, a: np.ndarray,
                                 b: np.ndarray) -> np.ndarray:
    """R-Sparse: (x where keep) @ W + ((x where not keep) @ A) @ B, keep = |x| * scale > t."""
    keep = active_mask(x, "scaled", threshold, scale)
    x64 = x.astype(np.float64)
    return (np.where(keep, x64, 0) @ w + (np.where(keep, 0, x64) @ a) @ b).astype(np.float32)


def activation(g: np.ndarray, act: str) -> np.ndarray:
    if act == "silu":
        return g / (1.0 + np.exp(-g))
    if act == "relu":
        return np.maximum(g, 0)
    raise ValueError(f"unknown activation {act!r}")


def ffn_reference(x, wg, wu, wd, act: str = "silu", return_hidden: bool = False):
    """Dense y = (act(x Wg) * (x Wu)) Wd (float64 inside); optionally also the hidden h."""
    x64 = x.astype(np.float64)
    h = activation(x64 @ wg, act) * (x64 @ wu)
    y = (h @ wd).astype(np.float32)
    return (y, h.astype(np.float32)) if return_hidden else y


def ffn_input_sparse_reference(x, t_in: float, t_down: float, wg, wu, wd, act: str = "silu"):
    """(a): zero inputs with |x| <= t_in, then zero hidden units with |h| <= t_down."""
    xs = np.where(np.abs(x) > np.float32(t_in), x, 0).astype(np.float64)
    h = activation(xs @ wg, act) * (xs @ wu)
    h32 = h.astype(np.float32)
    h = np.where(np.abs(h32) > np.float32(t_down), h, 0)
    return (h @ wd).astype(np.float32)


def ffn_gate_sparse_reference(x, threshold: float, wg, wu, wd, act: str = "relu"):
    """(b): neurons with |act(gate)| <= threshold contribute nothing."""
    x64 = x.astype(np.float64)
    a = activation(x64 @ wg, act)
    a = np.where(np.abs(a.astype(np.float32)) > np.float32(threshold), a, 0)
    return ((a * (x64 @ wu)) @ wd).astype(np.float32)


def ffn_indexed_reference(x, idx: np.ndarray, nnz: int, wg, wu, wd, act: str = "silu"):
    """(c): only neurons idx[:nnz] contribute."""
    keep = np.zeros(wg.shape[1], dtype=bool)
    keep[idx[:nnz]] = True
    x64 = x.astype(np.float64)
    h = activation(x64 @ wg, act) * (x64 @ wu)
    return (np.where(keep, h, 0) @ wd).astype(np.float32)
