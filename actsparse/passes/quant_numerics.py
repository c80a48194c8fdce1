"""The numerics of the quantize pass (passes/quantize.py), free of any graph: int8 weights per
output channel, calibrated activation ranges (minmax / percentile / entropy), group-wise int4 /
int8 weights (round to nearest or GPTQ) and the MatMulNBits byte packing. The codegen's kernels
and tests use them as the reference for what the graph stores."""

from __future__ import annotations

import numpy as np

from actsparse.errors import ActsparseError


# -------------------------------------------------------------------- int8 numerics

def quantize_per_channel(w_kn: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 per output channel: w ≈ q * scale[n], q in [-127, 127]. w_kn: [K, N]."""
    amax = np.max(np.abs(w_kn), axis=0)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.round(w_kn / scale), -127, 127).astype(np.int8)
    return q, scale


def activation_range(rows: np.ndarray, method: str, percentile: float = 99.99) -> tuple[float, float]:
    """The calibrated [lo, hi] range of an activation (always containing 0)."""
    x = np.asarray(rows, dtype=np.float32).ravel()
    lo, hi = float(x.min()), float(x.max())
    if method == "percentile":
        lo, hi = float(np.percentile(x, 100.0 - percentile)), float(np.percentile(x, percentile))
    elif method == "entropy":
        t = entropy_threshold(np.abs(x))
        lo, hi = max(lo, -t), min(hi, t)
    elif method != "minmax":
        raise ActsparseError(f"unknown calibration method {method!r}")
    return min(lo, 0.0), max(hi, 0.0)


def activation_qparams(rows: np.ndarray, act: str, method: str, percentile: float = 99.99) -> tuple[float, int]:
    """(scale, zero point) for a per-tensor activation: uint8 asymmetric or int8 symmetric."""
    if act == "int8":
        magnitude = np.abs(np.asarray(rows, dtype=np.float32).ravel())
        if method == "minmax":
            t = float(magnitude.max())
        elif method == "percentile":
            t = float(np.percentile(magnitude, percentile))
        else:
            t = entropy_threshold(magnitude)
        return (t / 127.0 if t > 0 else 1.0), 0
    lo, hi = activation_range(rows, method, percentile)
    scale = (hi - lo) / 255.0 if hi > lo else 1.0
    return scale, int(np.clip(np.round(-lo / scale), 0, 255))


def entropy_threshold(magnitude: np.ndarray, bins: int = 2048, levels: int = 128) -> float:
    """The clipping threshold of |x| that minimizes KL(P || Q) between the histogram P of |x|
    (outliers folded into the last bin) and its `levels`-level quantization Q (TensorRT's method)."""
    magnitude = np.asarray(magnitude, dtype=np.float32).ravel()
    amax = float(magnitude.max()) if magnitude.size else 0.0
    if amax == 0.0:
        return 0.0
    hist, edges = np.histogram(magnitude, bins=bins, range=(0.0, amax))
    hist = hist.astype(np.float64)
    best_kl, best_i = np.inf, bins
    tail = np.cumsum(hist[::-1])[::-1]  # tail[i] = sum(hist[i:])
    for i in range(levels, bins + 1):
        p = hist[:i].copy()
        if i < bins:
            p[-1] += tail[i]
        nonzero = hist[:i] > 0
        group = np.arange(i) * levels // i
        total = np.bincount(group, weights=hist[:i], minlength=levels)
        count = np.bincount(group, weights=nonzero, minlength=levels)
        q = np.where(nonzero, total[group] / np.maximum(count[group], 1), 0.0)
        kl = _kl_divergence(p, q)
        if kl < best_kl:
            best_kl, best_i = kl, i
    return float(edges[best_i])


def _kl_divergence(p: np.ndarray, q: np.ndarray) -> float:
    p = p / p.sum()
    if q.sum() == 0:
        return np.inf
    q = q / q.sum()
    mask = p > 0
    q = np.maximum(q, 1e-12)  # Q empty where P is not: a large but finite cost
    return float(np.sum(p[mask] * np.log(p[mask] / q[mask])))


# --------------------------------------------------------------- weight-only numerics

def quantize_blockwise(w_kn: np.ndarray, bits: int, group: int, symmetric: bool
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Round-to-nearest group-wise quantization along K. Returns codes [N, K_padded] (uint8,
    0..2^bits-1), scales [N, K_padded/group] and zero points [N, K_padded/group] (uint8), with
    w[k, n] ≈ (codes[n, k] - zero[n, k // group]) * scale[n, k // group]."""
    w = _pad_k(np.asarray(w_kn, dtype=np.float32).T, group)  # [N, Kp]
    n, kp = w.shape
    blocks = w.reshape(n, kp // group, group)
    scale, zero = _block_params(blocks, bits, symmetric)
    codes = np.clip(np.round(blocks / scale[..., None]) + zero[..., None], 0, (1 << bits) - 1)
    return codes.reshape(n, kp).astype(np.uint8), scale.astype(np.float32), zero.astype(np.uint8)


def dequantize_blockwise(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray, group: int, k: int) -> np.ndarray:
    """The float weight [K, N] that group-wise codes stand for (inverse of quantize_blockwise)."""
    n, kp = codes.shape
    blocks = codes.reshape(n, kp // group, group).astype(np.float32) - zeros[..., None].astype(np.float32)
    return (blocks * scales[..., None]).reshape(n, kp)[:, :k].T


def _block_params(blocks: np.ndarray, bits: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point per block (last axis). Symmetric: zero = 2^(bits-1), the 2^bits levels
    span [-amax, amax]; asymmetric: [min(w, 0), max(w, 0)] spans 0..2^bits-1."""
    maxq = (1 << bits) - 1
    if symmetric:
        amax = np.max(np.abs(blocks), axis=-1)
        scale = np.where(amax > 0, 2.0 * amax / maxq, 1.0)
        return scale, np.full(scale.shape, 1 << (bits - 1), dtype=np.float64)
    lo = np.minimum(blocks.min(axis=-1), 0.0)
    hi = np.maximum(blocks.max(axis=-1), 0.0)
    scale = np.where(hi > lo, (hi - lo) / maxq, 1.0)
    zero = np.clip(np.round(-lo / scale), 0, maxq)
    return scale, zero


def gptq_quantize(w_kn: np.ndarray, hessian: np.ndarray, bits: int, group: int, symmetric: bool,
                  *, damp: float = 0.1, act_order: bool = True, block: int = 128
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GPTQ (Frantar et al. 2022): quantize one input channel at a time and spread its rounding
    error over the channels not yet quantized, weighted by the inverse Hessian H = XᵀX of the
    layer's calibration inputs. act_order: channels with the largest H diagonal first, with each
    group's scale and zero point fixed beforehand from the original weights ("static groups"), so
    that groups stay contiguous along K. damp: fraction of mean(diag H) added to the diagonal (small
    calibration sets need more). Same outputs as quantize_blockwise."""
    w = _pad_k(np.asarray(w_kn, dtype=np.float64).T, group)  # [N, Kp]: GPTQ works on rows of W [out, in]
    n, kp = w.shape
    h = np.zeros((kp, kp))
    k = hessian.shape[0]
    h[:k, :k] = hessian
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h[np.diag_indices(kp)] += damp * np.mean(np.diag(h))
    order = np.argsort(-np.diag(h), kind="stable") if act_order else np.arange(kp)
    w, h = w[:, order], h[order][:, order]
    hinv = np.linalg.cholesky(np.linalg.inv(h)).T  # upper Cholesky factor of H^-1
    maxq = (1 << bits) - 1
    codes = np.zeros((n, kp), dtype=np.uint8)
    if act_order:
        scales, zeros = _block_params(_pad_k(np.asarray(w_kn, np.float64).T, group).reshape(n, kp // group, group),
                                      bits, symmetric)
    else:
        scales, zeros = np.zeros((n, kp // group)), np.zeros((n, kp // group))
    block = max(group, block // group * group)  # without act_order, groups never straddle a block
    for start in range(0, kp, block):
        stop = min(start + block, kp)
        w1 = w[:, start:stop].copy()
        err = np.zeros_like(w1)
        h1 = hinv[start:stop, start:stop]
        for i in range(stop - start):
            col = order[start + i]
            g = col // group
            if not act_order and col % group == 0:
                s, z = _block_params(w1[:, i:i + group][:, None, :], bits, symmetric)
                scales[:, g], zeros[:, g] = s[:, 0], z[:, 0]
            q = np.clip(np.round(w1[:, i] / scales[:, g]) + zeros[:, g], 0, maxq)
            codes[:, col] = q
            e = (w1[:, i] - (q - zeros[:, g]) * scales[:, g]) / h1[i, i]
            w1[:, i:] -= np.outer(e, h1[i, i:])
            err[:, i] = e
        w[:, stop:] -= err @ hinv[start:stop, stop:]
    return codes, scales.astype(np.float32), zeros.astype(np.uint8)


def layer_hessian(rows: np.ndarray) -> np.ndarray:
    """GPTQ's H = 2 XᵀX / rows of a layer's calibration inputs."""
    x = np.asarray(rows, dtype=np.float64)
    return 2.0 * x.T @ x / max(len(x), 1)


def _pad_k(w_nk: np.ndarray, group: int) -> np.ndarray:
    pad = (-w_nk.shape[1]) % group
    return np.pad(w_nk, ((0, 0), (0, pad))) if pad else w_nk


def pack_matmulnbits(codes: np.ndarray, bits: int, group: int) -> np.ndarray:
    """MatMulNBits' B: uint8 [N, K/group, group*bits/8], codes packed low bits first along K."""
    n, kp = codes.shape
    per_byte = 8 // bits
    c = codes.reshape(n, kp // per_byte, per_byte).astype(np.uint8)
    packed = np.zeros(c.shape[:2], dtype=np.uint8)
    for j in range(per_byte):
        packed |= c[..., j] << (bits * j)
    return packed.reshape(n, kp // group, group * bits // 8)


def pack_zero_points(zeros: np.ndarray, bits: int) -> np.ndarray:
    """MatMulNBits' zero_points: uint8 [N, ceil(K/group * bits / 8)], packed low bits first."""
    per_byte = 8 // bits
    n, blocks = zeros.shape
    pad = (-blocks) % per_byte
    z = np.pad(zeros.astype(np.uint8), ((0, 0), (0, pad))).reshape(n, -1, per_byte)
    packed = np.zeros(z.shape[:2], dtype=np.uint8)
    for j in range(per_byte):
        packed |= z[..., j] << (bits * j)
    return packed
