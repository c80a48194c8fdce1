"""R-Sparse at batch 1: y = (x where keep) @ W + ((x where not keep) @ A) @ B in one kernel.

keep_k = |x_k| * scale_k > t (the `rsparse` pass). A [K, r] and B [r, N] are W's low-rank factors.
The second product is r more weight rows with coefficients z = (x where not keep) @ A, so B is
stored under W, ``wb = [W; B]`` [K + r, N], and the sparse-input row walk reads the kept rows of W
and the rows of B alike (``sparse._row_steps_macro``: register blocks of y, whole rows per task).

One parallel region, no barrier: task c of P
1. computes its slice z[c rp/P : (c + 1) rp/P] over all K inputs, from its own panel of A
   (``pack_rank_sparse``: A as P panels [K, rp/P], zero-padded past r, so each task reads one
   contiguous stream);
2. lists the kept channels of its range of K (branch-free), then the rows of B of its z slice;
3. walks its list into its own partial y. The partials are summed at the end.
Each task needs the whole z only for its own rows of B, so no task waits for another.

Bytes read per token: the kept rows of W, all of A and B: (kept K + r) N + K r floats, the pass's
budget (1 - sparsity) K N.
"""

from __future__ import annotations

import numpy as np
from tvm.script import tirx as T

from actsparse.codegen.kernels.cpu.dense import DEFAULT_LANES
from actsparse.codegen.kernels.cpu.schedule import X86_ROWS, RowSchedule
from actsparse.codegen.kernels.cpu.sparse import ROW_CHUNKS, _row_steps_macro, _sum_partials_macro, default_rows_per_step


def rank_slice(rank: int, lanes: int, chunks: int) -> int:
    """Columns of A (entries of z) per task: whole vectors, enough for ``rank`` over ``chunks`` tasks."""
    return -(-rank // (chunks * lanes)) * lanes


def pack_rank_sparse(w: np.ndarray, a: np.ndarray, b: np.ndarray, lanes: int = DEFAULT_LANES,
                     chunks: int = ROW_CHUNKS):
    """(A as ``chunks`` panels [chunks, K, slice], zero past r; [W; B] [K + r, N]), float32, contiguous."""
    k, rank = a.shape
    width = rank_slice(rank, lanes, chunks)
    padded = np.zeros((k, chunks * width), np.float32)
    padded[:, :rank] = a
    panels = np.ascontiguousarray(padded.reshape(k, chunks, width).transpose(1, 0, 2))
    return panels, np.ascontiguousarray(np.concatenate([w, b]).astype(np.float32, copy=False))


def rank_sparse_matmul(k: int, n: int, rank: int, lanes: int = DEFAULT_LANES, rows_per_step: int | None = None,
                       chunks: int = ROW_CHUNKS, schedule: RowSchedule = X86_ROWS):
    """Batch-1 R-Sparse product.

    Signature: ``(x: f32[1, k], threshold: f32[1], scale: f32[k], a: f32[chunks, k, slice],
    wb: f32[k + rank, n], y: f32[1, n])`` with ``slice = rank_slice(rank, lanes, chunks)`` and (a, wb)
    from ``pack_rank_sparse``.
    """
    if rank < 1:
        raise ValueError(f"rank must be >= 1 (a rank-0 split is a plain sparse-input GEMV), got {rank}")
    R = rows_per_step or default_rows_per_step(1, schedule)
    P = chunks
    width = rank_slice(rank, lanes, P)
    vectors = width // lanes
    capacity = (k + P - 1) // P + width + R
    row_steps = _row_steps_macro(n, R, lanes, schedule.prefetch_steps, 4)
    sum_partials = _sum_partials_macro(n, lanes, P)

    @T.prim_func
    def rank_sparse_kernel(
        x: T.Buffer((1, k), "float32"),
        threshold: T.Buffer((1,), "float32"),
        scale: T.Buffer((k,), "float32"),
        a: T.Buffer((P, k, width), "float32"),
        wb: T.Buffer((k + rank, n), "float32"),
        y: T.Buffer((1, n), "float32"),
    ):
        T.func_attr({"tir.noalias": True})
        part = T.alloc_buffer((P, n), "float32")
        z = T.alloc_buffer((P, width), "float32")
        idx = T.alloc_buffer((P, capacity), "int32")
        xa = T.alloc_buffer((P, capacity), "float32")
        for c in T.parallel(P):
            for j in T.vectorized(width):
                z[c, j] = T.float32(0)
            for kk in range(k):  # this task's slice of z, over every dropped input
                coef = T.bind(T.Select(T.abs(x[0, kk]) * scale[kk] > threshold[0], T.float32(0), x[0, kk]))
                for v in range(vectors):
                    for j in T.vectorized(lanes):
                        z[c, v * lanes + j] = z[c, v * lanes + j] + coef * a[c, kk, v * lanes + j]
            count = T.alloc_buffer((1,), "int32")
            count[0] = 0
            for kk in range(c * k // P, (c + 1) * k // P):  # branch-free: write, advance if kept
                xa[c, count[0]] = x[0, kk]
                idx[c, count[0]] = kk
                count[0] = count[0] + T.Select(T.abs(x[0, kk]) * scale[kk] > threshold[0], 1, 0)
            kept = T.bind(count[0])
            rows = T.bind(T.max(T.min(width, rank - c * width), 0))  # this task's rows of B
            for j in range(rows):
                xa[c, kept + j] = z[c, j]
                idx[c, kept + j] = k + c * width + j
            listed = T.bind(kept + rows)
            steps = T.bind((listed + R - 1) // R)
            for p in range(steps * R - listed):  # pad with the last row (in cache) times 0
                idx[c, listed + p] = idx[c, listed - 1]
                xa[c, listed + p] = T.float32(0)
            for j in range(n):
                part[c, j] = T.float32(0)
            row_steps(wb, part, c, idx, xa, c, 0, steps, steps * R - 1)
        sum_partials(part, y)

    return rank_sparse_kernel
