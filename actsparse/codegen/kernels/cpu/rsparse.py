"""R-Sparse at batch 1: y = (x where keep) @ W + ((x where not keep) @ A) @ B in one kernel.

keep_k = |x_k| * scale_k > t (the `rsparse` pass). A [K, r] and B [r, N] are W's low-rank factors.
The second product is r more weight rows with coefficients z = (x where not keep) @ A, so B is
stored under W, ``wb = [W; B]`` [K + r, N], and one pass of the sparse-input row walk reads the kept
rows of W and all r rows of B together (one register block of y per step, one partial y per task,
as ``sparse.accumulate_rows_macro``):

1. z [r]: the rows of A times the dropped inputs (0 for kept ones), K split over parallel tasks,
   each summing into its own partial z (A is padded to whole vectors of r: ``pack_rank_sparse``);
2. list the kept channels k (branch-free, serially), then append the rows K .. K + r - 1 with the
   coefficients z, pad to whole steps;
3. walk the list: y = sum over listed rows j of coef_j * wb[row_j, :].

Bytes read per token: the kept rows of W, all of A and B: (kept K + r) N + K r floats, the pass's
budget (1 - sparsity) K N.
"""

from __future__ import annotations

import numpy as np
from tvm.script import tirx as T

from actsparse.codegen.kernels.cpu.dense import DEFAULT_LANES
from actsparse.codegen.kernels.cpu.sparse import ROW_CHUNKS, accumulate_rows_macro, default_rows_per_step, pad_macro


def padded_rank(rank: int, lanes: int) -> int:
    return -(-rank // lanes) * lanes


def pack_rank_sparse(w: np.ndarray, a: np.ndarray, b: np.ndarray, lanes: int = DEFAULT_LANES):
    """(A padded with zero columns to whole vectors [K, rp], [W; B] [K + r, N]), float32, contiguous."""
    k, rank = a.shape
    a_padded = np.zeros((k, padded_rank(rank, lanes)), np.float32)
    a_padded[:, :rank] = a
    return a_padded, np.ascontiguousarray(np.concatenate([w, b]).astype(np.float32, copy=False))


def _low_rank_input_macro(k: int, rank_padded: int, lanes: int, chunks: int):
    """T.macro(x, threshold, scale, a, zpart): zpart[c, :] = sum over the dropped k of task c's range
    of x[0, k] * a[k, :]."""
    P = chunks
    vectors = rank_padded // lanes

    @T.macro
    def low_rank_input(x, threshold, scale, a, zpart):
        for c in T.parallel(P):
            for j in T.vectorized(rank_padded):
                zpart[c, j] = T.float32(0)
            for kk in range(c * k // P, (c + 1) * k // P):
                coef = T.bind(T.Select(T.abs(x[0, kk]) * scale[kk] > threshold[0], T.float32(0), x[0, kk]))
                for v in range(vectors):
                    for j in T.vectorized(lanes):
                        zpart[c, v * lanes + j] = zpart[c, v * lanes + j] + coef * a[kk, v * lanes + j]

    return low_rank_input


def rank_sparse_matmul(k: int, n: int, rank: int, lanes: int = DEFAULT_LANES, rows_per_step: int | None = None,
                       chunks: int = ROW_CHUNKS):
    """Batch-1 R-Sparse product.

    Signature: ``(x: f32[1, k], threshold: f32[1], scale: f32[k], a: f32[k, rp], wb: f32[k + rank, n],
    y: f32[1, n])`` with ``rp = padded_rank(rank, lanes)`` and (a, wb) from ``pack_rank_sparse``.
    """
    if rank < 1:
        raise ValueError(f"rank must be >= 1 (a rank-0 split is a plain sparse-input GEMV), got {rank}")
    R = rows_per_step or default_rows_per_step(1)
    P = chunks
    rp = padded_rank(rank, lanes)
    capacity = k + rank + R
    low_rank_input = _low_rank_input_macro(k, rp, lanes, P)
    pad = pad_macro(1, R)
    accumulate = accumulate_rows_macro(n, R, lanes, P)

    @T.prim_func
    def rank_sparse_kernel(
        x: T.Buffer((1, k), "float32"),
        threshold: T.Buffer((1,), "float32"),
        scale: T.Buffer((k,), "float32"),
        a: T.Buffer((k, rp), "float32"),
        wb: T.Buffer((k + rank, n), "float32"),
        y: T.Buffer((1, n), "float32"),
    ):
        T.func_attr({"tir.noalias": True})
        zpart = T.alloc_buffer((P, rp), "float32")
        idx = T.alloc_buffer((capacity,), "int32")
        xa = T.alloc_buffer((1, capacity), "float32")
        count = T.alloc_buffer((1,), "int32")
        low_rank_input(x, threshold, scale, a, zpart)
        count[0] = 0
        for kk in range(k):  # branch-free: write, advance if kept
            xa[0, count[0]] = x[0, kk]
            idx[count[0]] = kk
            count[0] = count[0] + T.Select(T.abs(x[0, kk]) * scale[kk] > threshold[0], 1, 0)
        kept = T.bind(count[0])
        for j in range(rank):  # the rows of B, with coefficients z
            xa[0, kept + j] = zpart[0, j]
            for c in range(1, P):
                xa[0, kept + j] = xa[0, kept + j] + zpart[c, j]
            idx[kept + j] = k + j
        count[0] = kept + rank
        pad(idx, xa, count)
        accumulate(wb, y, idx, xa, count)

    return rank_sparse_kernel
