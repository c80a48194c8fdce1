"""Quantized-weight matmuls y = x @ W for CPUs: int8 per-output-channel and int4 group-wise.

Activations stay float32; weights are dequantized on the fly in registers (convert the
integer codes to float, FMA with x, apply the scales once per column or per group), so a
call reads 1/4 (int8) or ~1/8 (int4) of the fp32 weight bytes. Every kernel comes in a
dense form (column panels, one contiguous stream per thread, as ``dense.py``) and a
sparse-input form (K-major rows, only the rows of active input channels are read, as
``sparse.py``, with the same activity modes ``threshold`` / ``scaled`` / ``nonzero``).

Numerics (the references are in ``kernels/reference.py``):
  int8: w[k, n] = q[k, n] * scale[n],                      q int8 in [-127, 127]
  int4: w[k, n] = (c[k, n] - zero[g, n]) * scale[g, n],     c in 0..15, g = k // group
        (symmetric: zero = 8 everywhere, no zero-point array)
The int4 kernels sum x * c over a group first and apply the group's scale and zero point
once: y[n] += scale[g, n] * (sum_k x[k] c[k, n] - zero[g, n] * sum_k x[k]).

int4 byte layout: a block of 2*lanes output columns is stored in `lanes` bytes per row;
byte j holds column j in its low nibble and column j + lanes in its high nibble, so one
contiguous load unpacks into two whole vectors with an AND and a shift.
"""

from __future__ import annotations

import numpy as np
from tvm.script import tirx as T

from actsparse.codegen.kernels.cpu.dense import DEFAULT_LANES, panel_count
from actsparse.codegen.kernels.params import without_params
# (int8 rows of 1 KB at batch 1 also took 8 rows per step over 16: 0.09 vs 0.13 ms, K=2816 N=1024)
from actsparse.codegen.kernels.activity import active_expr, check_mode
from actsparse.codegen.kernels.cpu.schedule import X86_ROWS, RowSchedule, prefetch_l2
from actsparse.codegen.kernels.cpu.sparse import (ROW_CHUNKS, ROWS_PER_STEP, _sum_partials_macro, batch1_rows_macro,
                                                  compact_macro, default_chunks, default_rows_per_step)

INT4_SYMMETRIC_ZERO = 8
K_UNROLL = 4  # independent accumulators in the dense kernels: hides the FMA latency


# ------------------------------------------------------------------------------- packing

def _pad_columns(a: np.ndarray, width: int) -> np.ndarray:
    if a.shape[-1] == width:
        return np.ascontiguousarray(a)
    out = np.zeros((*a.shape[:-1], width), dtype=a.dtype)
    out[..., : a.shape[-1]] = a
    return out


def pack_int8_dense(q: np.ndarray, scale: np.ndarray, lanes: int = DEFAULT_LANES):
    """int8 W [K, N] + scale [N] -> (panels int8 [NB, K, 2L], scale f32 [NB*2L]), zero-padded."""
    k, n = q.shape
    block = 2 * lanes
    nb = panel_count(n, block)
    padded = _pad_columns(np.asarray(q, np.int8), nb * block)
    panels = np.ascontiguousarray(padded.reshape(k, nb, block).transpose(1, 0, 2))
    return panels, _pad_columns(np.asarray(scale, np.float32).reshape(-1), nb * block)


def pack_int8_sparse(q: np.ndarray, scale: np.ndarray, lanes: int = DEFAULT_LANES):
    """int8 W [K, N] + scale [N] -> (rows int8 [K, Np], scale f32 [Np]), Np = N rounded up to 2L."""
    k, n = q.shape
    width = panel_count(n, 2 * lanes) * 2 * lanes
    return _pad_columns(np.asarray(q, np.int8), width), _pad_columns(np.asarray(scale, np.float32).reshape(-1), width)


def _nibble_blocks(codes_kn: np.ndarray, lanes: int) -> np.ndarray:
    """codes [K, Np] (0..15, Np a multiple of 2L) -> bytes [K, Np/2] in the block layout."""
    k, width = codes_kn.shape
    blocks = codes_kn.reshape(k, width // (2 * lanes), 2, lanes).astype(np.uint8)
    return (blocks[:, :, 0, :] | (blocks[:, :, 1, :] << 4)).reshape(k, width // 2)


def _int4_operands(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray | None, k: int, lanes: int):
    """MatMulNBits-style codes [N, Kp] (uint8 0..15), scales/zeros [N, G] -> K-major padded arrays."""
    n = codes.shape[0]
    width = panel_count(n, 2 * lanes) * 2 * lanes
    codes_kn = _pad_columns(np.asarray(codes, np.uint8)[:, :k].T, width)
    if width > n:  # padded columns: code = zero point, so they contribute exactly 0
        codes_kn[:, n:] = INT4_SYMMETRIC_ZERO if zeros is None else 0
    scales_gn = _pad_columns(np.asarray(scales, np.float32).T, width)
    zeros_gn = None if zeros is None else _pad_columns(np.asarray(zeros, np.float32).T, width)
    return codes_kn, scales_gn, zeros_gn


def pack_int4_dense(codes, scales, zeros=None, *, k: int, lanes: int = DEFAULT_LANES):
    """Group-wise int4 (codes [N, Kp], scales [N, G], zeros [N, G] or None; ``quantize_blockwise``)
    -> (codes u8 [NB, K, L], scales f32 [NB, G, 2L][, zeros f32 [NB, G, 2L]]) column panels."""
    codes_kn, scales_gn, zeros_gn = _int4_operands(codes, scales, zeros, k, lanes)
    nb = codes_kn.shape[1] // (2 * lanes)
    packed = np.ascontiguousarray(_nibble_blocks(codes_kn, lanes).reshape(k, nb, lanes).transpose(1, 0, 2))

    def panels(a):
        return np.ascontiguousarray(a.reshape(a.shape[0], nb, 2 * lanes).transpose(1, 0, 2))

    out = [packed, panels(scales_gn)]
    if zeros_gn is not None:
        out.append(panels(zeros_gn))
    return tuple(out)


def pack_int4_sparse(codes, scales, zeros=None, *, k: int, lanes: int = DEFAULT_LANES):
    """Group-wise int4 -> K-major (codes u8 [K, Np/2], scales f32 [G, Np][, zeros f32 [G, Np]]):
    the codes of input channel k are one contiguous row."""
    codes_kn, scales_gn, zeros_gn = _int4_operands(codes, scales, zeros, k, lanes)
    out = [np.ascontiguousarray(_nibble_blocks(codes_kn, lanes)), scales_gn]
    if zeros_gn is not None:
        out.append(zeros_gn)
    return tuple(out)


def group_count(k: int, group: int) -> int:
    return (k + group - 1) // group


# ----------------------------------------------------------------------------- int8 dense

def int8_dense_matmul(m: int, k: int, n: int, lanes: int = DEFAULT_LANES):
    """y = x @ (q * scale) with W packed by ``pack_int8_dense``.

    Signature: ``(x: f32[m, k], wq: i8[NB, k, 2L], scale: f32[NB*2L], y: f32[m, n])``.
    Parallel over column panels; K_UNROLL independent accumulators per panel. No stream prefetch
    (``schedule.stream_prefetch_macro``): this kernel converts every byte to float and runs below
    the bandwidth, and the prefetch made it 3-18 % slower (K=1024/2816, batch 1, out of cache).
    """
    block = 2 * lanes
    nb = panel_count(n, block)
    U = K_UNROLL
    k_main = k // U * U

    @T.prim_func
    def int8_dense_kernel(
        x: T.Buffer((m, k), "float32"),
        wq: T.Buffer((nb, k, block), "int8"),
        scale: T.Buffer((nb * block,), "float32"),
        y: T.Buffer((m, n), "float32"),
    ):
        T.func_attr({"tir.noalias": True})
        for b in T.parallel(nb):
            for i in range(m):
                acc = T.alloc_buffer((U, block), "float32")
                for u in T.unroll(U):
                    for j in T.vectorized(block):
                        acc[u, j] = T.float32(0)
                for k0 in range(k_main // U):
                    for u in T.unroll(U):
                        xv = T.bind(x[i, k0 * U + u])
                        for j in T.vectorized(block):
                            acc[u, j] = acc[u, j] + xv * T.Cast("float32", wq[b, k0 * U + u, j])
                for kk in range(k - k_main):
                    xv = T.bind(x[i, k_main + kk])
                    for j in T.vectorized(block):
                        acc[0, j] = acc[0, j] + xv * T.Cast("float32", wq[b, k_main + kk, j])
                for u in T.unroll(U - 1):
                    for j in T.vectorized(block):
                        acc[0, j] = acc[0, j] + acc[u + 1, j]
                _store_panel(y, acc, scale, i, b, block, n)

    return int8_dense_kernel


@T.macro
def _store_panel(y, acc, scale, i, b, block, n):
    if b * block + block <= n:
        for j in T.vectorized(block):
            y[i, b * block + j] = acc[0, j] * scale[b * block + j]
    else:
        for j in range(block):
            if b * block + j < n:
                y[i, b * block + j] = acc[0, j] * scale[b * block + j]


# ----------------------------------------------------------------------------- int4 dense

def int4_dense_matmul(m: int, k: int, n: int, group: int, zero_points: bool = False, lanes: int = DEFAULT_LANES):
    """y = x @ W for group-wise int4 W packed by ``pack_int4_dense``.

    Signature: ``(x: f32[m, k], wq: u8[NB, k, L], scales: f32[NB, G, 2L][, zeros: f32[NB, G, 2L]], y: f32[m, n])``.
    """
    block = 2 * lanes
    nb = panel_count(n, block)
    G = group_count(k, group)
    U = K_UNROLL
    if group % U:
        raise ValueError(f"group must be a multiple of {U}, got {group}")
    last = k - (G - 1) * group  # rows in the last group
    zero = T.float32(INT4_SYMMETRIC_ZERO)

    @T.macro
    def body(x, wq, scales, zeros, y):
        xs = T.alloc_buffer((m, G), "float32")
        for i in range(m):
            for g in range(G):
                xs[i, g] = T.float32(0)
                for kk in range(T.min(group, k - g * group)):
                    xs[i, g] = xs[i, g] + x[i, g * group + kk]
        for b in T.parallel(nb):
            for i in range(m):
                acc = T.alloc_buffer((2, lanes), "float32")
                for h in T.unroll(2):
                    for j in T.vectorized(lanes):
                        acc[h, j] = T.float32(0)
                for g in range(G):
                    inner = T.alloc_buffer((2 * U, lanes), "float32")
                    for u in T.unroll(2 * U):
                        for j in T.vectorized(lanes):
                            inner[u, j] = T.float32(0)
                    rows = T.bind(T.if_then_else(g == G - 1, last, group))
                    for k0 in range(rows // U):
                        for u in T.unroll(U):
                            kk = T.bind(g * group + k0 * U + u)
                            xv = T.bind(x[i, kk])
                            for j in T.vectorized(lanes):
                                byte = T.bind(T.Cast("int32", wq[b, kk, j]))
                                inner[2 * u, j] = inner[2 * u, j] + xv * T.Cast("float32", T.bitwise_and(byte, 15))
                                inner[2 * u + 1, j] = inner[2 * u + 1, j] + xv * T.Cast(
                                    "float32", T.shift_right(byte, 4))
                    for kr in range(rows - rows // U * U):
                        kk = T.bind(g * group + rows // U * U + kr)
                        xv = T.bind(x[i, kk])
                        for j in T.vectorized(lanes):
                            byte = T.bind(T.Cast("int32", wq[b, kk, j]))
                            inner[0, j] = inner[0, j] + xv * T.Cast("float32", T.bitwise_and(byte, 15))
                            inner[1, j] = inner[1, j] + xv * T.Cast("float32", T.shift_right(byte, 4))
                    for h in T.unroll(2):
                        for j in T.vectorized(lanes):
                            total = T.bind(inner[h, j] + inner[2 + h, j] + inner[4 + h, j] + inner[6 + h, j])
                            if zero_points:
                                z = T.bind(zeros[b, g, h * lanes + j])
                            else:
                                z = T.bind(zero)
                            acc[h, j] = acc[h, j] + scales[b, g, h * lanes + j] * (total - z * xs[i, g])
                if b * block + block <= n:
                    for h in T.unroll(2):
                        for j in T.vectorized(lanes):
                            y[i, b * block + h * lanes + j] = acc[h, j]
                else:
                    for h in range(2):
                        for j in range(lanes):
                            if b * block + h * lanes + j < n:
                                y[i, b * block + h * lanes + j] = acc[h, j]

    @T.prim_func
    def int4_dense_kernel(
        x: T.Buffer((m, k), "float32"),
        wq: T.Buffer((nb, k, lanes), "uint8"),
        scales: T.Buffer((nb, G, block), "float32"),
        zeros: T.Buffer((nb, G, block), "float32"),
        y: T.Buffer((m, n), "float32"),
    ):
        T.func_attr({"tir.noalias": True})
        body(x, wq, scales, zeros, y)

    return without_params(int4_dense_kernel, set() if zero_points else {"zeros"})


# ------------------------------------------------------------------------ sparse inputs

def _mode_unused(mode: str) -> set[str]:
    check_mode(mode)
    return {"nonzero": {"threshold", "act_scale"}, "threshold": {"act_scale"}, "scaled": set()}[mode]


def int8_sparse_matmul(m: int, k: int, n: int, mode: str = "threshold", rows_per_step: int | None = None,
                       lanes: int = DEFAULT_LANES, chunks: int | None = None, schedule: RowSchedule = X86_ROWS):
    """Sparse-input y = x @ (q * scale): only rows q[k, :] of active channels are read.

    Signature (W from ``pack_int8_sparse``; threshold / act_scale as in ``sparse_matmul``):
      ``(x: f32[m, k], [threshold: f32[1]], [act_scale: f32[k]], wq: i8[k, Np], scale: f32[Np], y: f32[m, n])``
    Two partial accumulators per column block (even / odd active rows) halve the FMA chain.
    """
    unused = _mode_unused(mode)
    R = rows_per_step or default_rows_per_step(m, schedule)
    cb = 2 * lanes if m <= 4 else lanes
    width = panel_count(n, 2 * lanes) * 2 * lanes
    blocks = width // cb
    P = chunks or default_chunks(m, width, cb)
    capacity = k + R
    compact = compact_macro(mode, m, k, R)
    int8_rows = _int8_sparse_rows_macro(mode, k, n, width, R, lanes, chunks or ROW_CHUNKS, schedule)
    int8_columns = _int8_sparse_columns_macro(m, n, width, R, lanes, cb, P)

    @T.prim_func
    def int8_sparse_kernel(
        x: T.Buffer((m, k), "float32"),
        threshold: T.Buffer((1,), "float32"),
        act_scale: T.Buffer((k,), "float32"),
        wq: T.Buffer((k, width), "int8"),
        scale: T.Buffer((width,), "float32"),
        y: T.Buffer((m, n), "float32"),
    ):
        T.func_attr({"tir.noalias": True})
        if m == 1:
            int8_rows(x, threshold, act_scale, wq, scale, y)
        else:
            idx = T.alloc_buffer((capacity,), "int32")
            xa = T.alloc_buffer((m, capacity), "float32")
            count = T.alloc_buffer((1,), "int32")
            compact(x, threshold, act_scale, idx, xa, count)
            int8_columns(wq, scale, y, idx, xa, T.bind((count[0] + R - 1) // R))

    return without_params(int8_sparse_kernel, unused)


def _int8_sparse_rows_macro(mode: str, k: int, n: int, width: int, R: int, lanes: int, P: int,
                            schedule: RowSchedule):
    """Batch 1: whole int8 rows (1-3 KB) summed into a partial y per parallel task
    (``sparse.batch1_rows_macro``), then scaled per column (the row split ran 1.3-1.7x the column
    split)."""
    accumulate = batch1_rows_macro(mode, k, width, R, lanes, P, element_bytes=1, schedule=schedule)

    @T.macro
    def rows(x, threshold, act_scale, wq, scale, y):
        unscaled = T.alloc_buffer((1, width), "float32")
        accumulate(x, threshold, act_scale, wq, unscaled)
        for j in range(n):
            y[0, j] = unscaled[0, j] * scale[j]

    return rows


def _int8_sparse_columns_macro(m: int, n: int, width: int, R: int, lanes: int, cb: int, P: int):
    """The output columns split over ``P`` tasks, all rows of the batch in registers."""
    blocks = width // cb

    @T.macro
    def columns(wq, scale, y, idx, xa, steps):
        yacc = T.alloc_buffer((m, width), "float32")
        for c in T.parallel(P):
            lo = T.bind(c * blocks // P)
            hi = T.bind((c + 1) * blocks // P)
            for b in range(lo, hi):
                for i in T.unroll(m):
                    for j in T.vectorized(cb):
                        yacc[i, b * cb + j] = T.float32(0)
            for s in range(steps):
                for b in range(lo, hi):
                    acc = T.alloc_buffer((2, m, cb), "float32")
                    for i in T.unroll(m):
                        for j in T.vectorized(cb):
                            acc[0, i, j] = yacc[i, b * cb + j]
                            acc[1, i, j] = T.float32(0)
                    for r in T.unroll(R):
                        row = T.bind(idx[s * R + r])
                        for i in T.unroll(m):
                            coef = T.bind(xa[i, s * R + r])
                            for j in T.vectorized(cb):
                                acc[r % 2, i, j] = acc[r % 2, i, j] + coef * T.Cast("float32", wq[row, b * cb + j])
                    for i in T.unroll(m):
                        for j in T.vectorized(cb):
                            yacc[i, b * cb + j] = acc[0, i, j] + acc[1, i, j]
            for b in range(lo, hi):
                for i in range(m):
                    if b * cb + cb <= n:
                        for j in T.vectorized(cb):
                            y[i, b * cb + j] = yacc[i, b * cb + j] * scale[b * cb + j]
                    else:
                        for j in range(cb):
                            if b * cb + j < n:
                                y[i, b * cb + j] = yacc[i, b * cb + j] * scale[b * cb + j]

    return columns


def _group_compact_macro(mode: str, m: int, k: int, group: int, rows_per_step: int):
    """T.macro(x, threshold, act_scale, idx, xa, step_group, coef_sum, nsteps): the active
    channels of x, group by group, each group's list padded to whole steps of ``rows_per_step``
    (repeats of its last active row with zero coefficients), so that no step straddles a
    group: a step's rows share one scale/zero row. coef_sum[i, s] = sum of the step's coefficients.
    """
    R = rows_per_step
    G = group_count(k, group)

    @T.macro
    def compact(x, threshold, act_scale, idx, xa, step_group, coef_sum, nsteps):
        count = T.alloc_buffer((1,), "int32")
        count[0] = 0
        nsteps[0] = 0
        for g in range(G):
            start = T.bind(count[0])
            for kk in range(T.min(group, k - g * group)):
                ch = T.bind(g * group + kk)
                hit = T.alloc_buffer((1,), "int32")
                hit[0] = 0
                for i in T.unroll(m):
                    active = T.bind(active_expr(mode, x[i, ch], threshold, act_scale, ch))
                    xa[i, count[0]] = T.Select(active, x[i, ch], T.float32(0))
                    hit[0] = T.max(hit[0], T.Select(active, 1, 0))
                idx[count[0]] = ch
                count[0] = count[0] + hit[0]
            found = T.bind(count[0] - start)
            padded = T.bind((found + R - 1) // R * R)
            for p in range(padded - found):
                idx[count[0] + p] = idx[count[0] - 1]
                for i in T.unroll(m):
                    xa[i, count[0] + p] = T.float32(0)
            for st in range(padded // R):
                step_group[nsteps[0] + st] = g
                for i in T.unroll(m):
                    coef_sum[i, nsteps[0] + st] = T.float32(0)
                    for r in range(R):
                        coef_sum[i, nsteps[0] + st] = coef_sum[i, nsteps[0] + st] + xa[i, start + st * R + r]
            count[0] = start + padded
            nsteps[0] = nsteps[0] + padded // R

    return compact


def int4_sparse_matmul(m: int, k: int, n: int, group: int, mode: str = "threshold", zero_points: bool = False,
                       rows_per_step: int = ROWS_PER_STEP, lanes: int = DEFAULT_LANES, chunks: int | None = None):
    """Sparse-input y = x @ W for group-wise int4 W packed by ``pack_int4_sparse`` (K-major).

    Signature: ``(x: f32[m, k], [threshold: f32[1]], [act_scale: f32[k]], wq: u8[k, Np/2],
    scales: f32[G, Np], [zeros: f32[G, Np]], y: f32[m, n])``.
    Per step of ``rows_per_step`` active rows of one group and per block of 2L columns:
    sum coef * code in registers, then yacc += scale * (sum - zero * sum(coef)).
    """
    unused = _mode_unused(mode) | (set() if zero_points else {"zeros"})
    R = rows_per_step
    G = group_count(k, group)
    width = panel_count(n, 2 * lanes) * 2 * lanes
    cb = 2 * lanes
    blocks = width // cb
    P = chunks or default_chunks(m, width, cb)
    capacity = k + G * R
    max_steps = k // R + G + 1
    compact = _group_compact_macro(mode, m, k, group, R)
    sym_zero = T.float32(INT4_SYMMETRIC_ZERO)

    @T.prim_func
    def int4_sparse_kernel(
        x: T.Buffer((m, k), "float32"),
        threshold: T.Buffer((1,), "float32"),
        act_scale: T.Buffer((k,), "float32"),
        wq: T.Buffer((k, width // 2), "uint8"),
        scales: T.Buffer((G, width), "float32"),
        zeros: T.Buffer((G, width), "float32"),
        y: T.Buffer((m, n), "float32"),
    ):
        T.func_attr({"tir.noalias": True})
        idx = T.alloc_buffer((capacity,), "int32")
        xa = T.alloc_buffer((m, capacity), "float32")
        step_group = T.alloc_buffer((max_steps,), "int32")
        coef_sum = T.alloc_buffer((m, max_steps), "float32")
        nsteps = T.alloc_buffer((1,), "int32")
        yacc = T.alloc_buffer((m, width), "float32")
        compact(x, threshold, act_scale, idx, xa, step_group, coef_sum, nsteps)
        for c in T.parallel(P):
            lo = T.bind(c * blocks // P)
            hi = T.bind((c + 1) * blocks // P)
            for b in range(lo, hi):
                for i in T.unroll(m):
                    for j in T.vectorized(cb):
                        yacc[i, b * cb + j] = T.float32(0)
            for s in range(nsteps[0]):
                g = T.bind(step_group[s])
                for b in range(lo, hi):
                    inner = T.alloc_buffer((2, m, 2, lanes), "float32")
                    for i in T.unroll(m):
                        for h in T.unroll(2):
                            for j in T.vectorized(lanes):
                                inner[0, i, h, j] = T.float32(0)
                                inner[1, i, h, j] = T.float32(0)
                    for r in T.unroll(R):
                        row = T.bind(idx[s * R + r])
                        for i in T.unroll(m):
                            coef = T.bind(xa[i, s * R + r])
                            for j in T.vectorized(lanes):
                                byte = T.bind(T.Cast("int32", wq[row, b * lanes + j]))
                                inner[r % 2, i, 0, j] = inner[r % 2, i, 0, j] + coef * T.Cast(
                                    "float32", T.bitwise_and(byte, 15))
                                inner[r % 2, i, 1, j] = inner[r % 2, i, 1, j] + coef * T.Cast(
                                    "float32", T.shift_right(byte, 4))
                    for i in T.unroll(m):
                        for h in T.unroll(2):
                            for j in T.vectorized(lanes):
                                col = T.bind(b * cb + h * lanes + j)
                                if zero_points:
                                    z = T.bind(zeros[g, col])
                                else:
                                    z = T.bind(sym_zero)
                                yacc[i, col] = yacc[i, col] + scales[g, col] * (
                                    inner[0, i, h, j] + inner[1, i, h, j] - z * coef_sum[i, s])
            for b in range(lo, hi):
                for i in range(m):
                    if b * cb + cb <= n:
                        for j in T.vectorized(cb):
                            y[i, b * cb + j] = yacc[i, b * cb + j]
                    else:
                        for j in range(cb):
                            if b * cb + j < n:
                                y[i, b * cb + j] = yacc[i, b * cb + j]

    return without_params(int4_sparse_kernel, unused)


# ------------------------------------------------------------------ int4 dense, AVX-512 VNNI

VNNI_LANES = 16


def has_int8_dot_product(target) -> bool:
    """Whether a ``tvm.target.Target`` has AVX-512 VNNI (vpdpbusd on 512-bit vectors; TargetInfo.vnni)."""
    from actsparse.codegen.targets import describe_target

    return describe_target(target).vnni


def pack_int4_dense_vnni(codes, scales, zeros=None, *, k: int, group: int):
    """Group-wise int4 for ``int4_dense_matmul_vnni``: (codes u8 [NB, Kp/4, 64], scales f32 [NB, G, 32]
    [, zeros]) with Kp = K rounded up to the group. In each 64-byte row, bytes 4j..4j+3 hold input
    rows 4r..4r+3 of panel column j (low nibble) and of column 16 + j (high nibble): the operand
    layout of one vpdpbusd per 16 columns."""
    G = group_count(k, group)
    kp = G * group
    packed, *rest = pack_int4_dense(codes, scales, zeros, k=k, lanes=VNNI_LANES)  # [NB, K, 16]
    nb = packed.shape[0]
    full = np.zeros((nb, kp, VNNI_LANES), np.uint8)
    full[:, :k] = packed
    vnni = full.reshape(nb, kp // 4, 4, VNNI_LANES).transpose(0, 1, 3, 2).reshape(nb, kp // 4, 4 * VNNI_LANES)
    return (np.ascontiguousarray(vnni), *rest)


def int4_dense_matmul_vnni(m: int, k: int, n: int, group: int, zero_points: bool = False):
    """y = x @ W for group-wise int4 W on x86 with AVX-512 VNNI, packed by ``pack_int4_dense_vnni``.

    Signature: ``(x: f32[m, k], wq: u8[NB, Kp/4, 64], scales: f32[NB, G, 32][, zeros], y: f32[m, n])``.
    x is quantized per group to int8 (symmetric, scale max|x|/127; onnxruntime's MatMulNBits at
    accuracy_level 4 does the same), then each 64-byte load of codes feeds two vpdpbusd (64 u8 x s8
    products each) instead of 2 x 16 int-to-float conversions and FMAs per 16 bytes:
    y = sum_g scale_g * s_x,g * (sum_k code * x_q - zero * sum_k x_q).
    Measured (K=1024 N=2816 / K=2816 N=1024, batch 1): 1.65x / 1.31x onnxruntime's MatMulNBits,
    1.5x / 1.4x the float-dequantizing ``int4_dense_matmul``.
    """
    if group % (2 * VNNI_LANES):
        raise ValueError(f"group must be a multiple of {2 * VNNI_LANES}, got {group}")
    block = 2 * VNNI_LANES
    nb = panel_count(n, block)
    G = group_count(k, group)
    kp = G * group
    steps = group // 4
    sym_zero = T.float32(INT4_SYMMETRIC_ZERO)
    vpdpbusd = "llvm.x86.avx512.vpdpbusd.512"

    @T.macro
    def body(x, wq, scales, zeros, y):
        xq = T.alloc_buffer((m * kp,), "int8")
        sx = T.alloc_buffer((m, G), "float32")
        xsum = T.alloc_buffer((m, G), "float32")
        xpad = T.alloc_buffer((m, kp), "float32")
        for i in range(m):
            for kk in range(kp):
                xpad[i, kk] = T.Select(kk < k, x[i, T.min(kk, k - 1)], T.float32(0))
        for i in range(m):
            for g in range(G):
                vmax = T.alloc_buffer((VNNI_LANES,), "float32")
                vsum = T.alloc_buffer((VNNI_LANES,), "int32")
                amax = T.alloc_buffer((1,), "float32")
                total = T.alloc_buffer((1,), "int32")
                for j in T.vectorized(VNNI_LANES):
                    vmax[j] = T.float32(0)
                    vsum[j] = 0
                for c in range(group // VNNI_LANES):
                    for j in T.vectorized(VNNI_LANES):
                        vmax[j] = T.max(vmax[j], T.abs(xpad[i, g * group + c * VNNI_LANES + j]))
                amax[0] = T.float32(0)
                for j in range(VNNI_LANES):
                    amax[0] = T.max(amax[0], vmax[j])
                inv = T.bind(T.Select(amax[0] > T.float32(0), T.float32(127) / amax[0], T.float32(0)))
                sx[i, g] = amax[0] / T.float32(127)
                for c in range(group // VNNI_LANES):
                    for j in T.vectorized(VNNI_LANES):
                        q = T.bind(T.Cast("int32", T.round(xpad[i, g * group + c * VNNI_LANES + j] * inv)))
                        xq[i * kp + g * group + c * VNNI_LANES + j] = T.Cast("int8", q)
                        vsum[j] = vsum[j] + q
                total[0] = 0
                for j in range(VNNI_LANES):
                    total[0] = total[0] + vsum[j]
                xsum[i, g] = T.Cast("float32", total[0])
        wflat = T.decl_buffer((nb * (kp // 4) * 64,), "uint8", data=wq.data)
        for b in T.parallel(nb):
            for i in range(m):
                acc = T.alloc_buffer((block,), "float32")
                for j in T.vectorized(block):
                    acc[j] = T.float32(0)
                for g in range(G):
                    ia = T.alloc_buffer((4, VNNI_LANES), "int32")
                    for u in range(4):
                        ia[u, T.ramp(0, 1, VNNI_LANES)] = T.broadcast(T.int32(0), VNNI_LANES)
                    for s2 in range(steps // 2):
                        for u in T.unroll(2):
                            k4 = T.bind(g * steps + s2 * 2 + u)
                            w64 = T.bind(wflat[T.ramp((b * (kp // 4) + k4) * 64, 1, 64)])
                            lo = T.bind(T.bitwise_and(w64, T.broadcast(T.uint8(15), 64)))
                            hi = T.bind(T.shift_right(w64, T.broadcast(T.uint8(4), 64)))
                            xv = T.bind(T.reinterpret("int8x64", T.broadcast(
                                T.reinterpret("int32", xq[T.ramp(i * kp + k4 * 4, 1, 4)]), VNNI_LANES)))
                            ia[2 * u, T.ramp(0, 1, VNNI_LANES)] = T.call_llvm_pure_intrin(
                                "int32x16", T.llvm_lookup_intrinsic_id(vpdpbusd), ia[2 * u, T.ramp(0, 1, VNNI_LANES)],
                                lo, xv)
                            ia[2 * u + 1, T.ramp(0, 1, VNNI_LANES)] = T.call_llvm_pure_intrin(
                                "int32x16", T.llvm_lookup_intrinsic_id(vpdpbusd), ia[2 * u + 1, T.ramp(0, 1, VNNI_LANES)],
                                hi, xv)
                    for h in T.unroll(2):
                        for j in T.vectorized(VNNI_LANES):
                            col = T.bind(h * VNNI_LANES + j)
                            if zero_points:
                                z = T.bind(zeros[b, g, col])
                            else:
                                z = T.bind(sym_zero)
                            dot = T.bind(T.Cast("float32", ia[h, j] + ia[2 + h, j]))
                            acc[col] = acc[col] + scales[b, g, col] * sx[i, g] * (dot - z * xsum[i, g])
                if b * block + block <= n:
                    for j in T.vectorized(block):
                        y[i, b * block + j] = acc[j]
                else:
                    for j in range(block):
                        if b * block + j < n:
                            y[i, b * block + j] = acc[j]

    @T.prim_func
    def int4_dense_vnni_kernel(
        x: T.Buffer((m, k), "float32"),
        wq: T.Buffer((nb, kp // 4, 64), "uint8"),
        scales: T.Buffer((nb, G, block), "float32"),
        zeros: T.Buffer((nb, G, block), "float32"),
        y: T.Buffer((m, n), "float32"),
    ):
        T.func_attr({"tir.noalias": True})
        body(x, wq, scales, zeros, y)

    return without_params(int4_dense_vnni_kernel, set() if zero_points else {"zeros"})


# --------------------------------------------------------------- int8 sparse, AVX-512 VNNI

VNNI_BLOCK = 4 * VNNI_LANES  # output columns per 64-byte weight load
VNNI_WEIGHT_OFFSET = 128  # vpdpbusd multiplies u8 by s8: weights are stored as q + 128


def pack_int8_sparse_vnni(q: np.ndarray, scale: np.ndarray):
    """int8 W [K, N] + scale [N] -> (rows u8 [K, Np], scale f32 [Np]) for ``int8_sparse_matmul_vnni``.

    Np = N rounded up to 64. Row k stays contiguous (only active rows are read); inside each block
    of 64 columns, byte 4i + t holds column 16t + i, so accumulator t of one vpdpbusd per block
    collects columns 16t .. 16t + 15 in order. Codes are offset by +128 (u8)."""
    k, n = q.shape
    width = panel_count(n, VNNI_BLOCK) * VNNI_BLOCK
    shifted = _pad_columns(np.asarray(q, np.int16) + VNNI_WEIGHT_OFFSET, width).astype(np.uint8)
    blocks = shifted.reshape(k, width // VNNI_BLOCK, 4, VNNI_LANES)  # [k, b, t, i] = column 16t + i
    rows = np.ascontiguousarray(blocks.transpose(0, 1, 3, 2)).reshape(k, width)  # byte 4i + t
    return rows, _pad_columns(np.asarray(scale, np.float32).reshape(-1), width)


# Lines of already-listed rows the VNNI kernel prefetches per channel it lists: the listing
# (2.5-3 us at K=2816, a 20th of the call out of cache) then overlaps the first rows' fetch
# instead of preceding it. Out of cache at 50 %, interleaved A/Bs: 2 lines +1 to +7 % (median of
# rounds; five A/Bs, K=2816 N=1024 and K=1024 N=2816); 1 and 4 lines about as much; 8 no gain.
LISTING_PREFETCH_LINES = 2


def int8_sparse_matmul_vnni(k: int, n: int, mode: str = "threshold", rows_per_step: int = X86_ROWS.rows_per_step,
                            chunks: int | None = None, prefetch_steps: int = X86_ROWS.prefetch_steps,
                            listing_prefetch_lines: int = LISTING_PREFETCH_LINES):
    """Batch-1 sparse-input y = x @ (q * scale) on x86 with AVX-512 VNNI, W packed by ``pack_int8_sparse_vnni``.

    Signature: ``(x: f32[1, k], [threshold: f32[1]], [act_scale: f32[k]], wq: u8[k, Np], scale: f32[Np], y: f32[1, n])``.
    The active inputs are rounded to int8 (symmetric, per token: s_x = max |active x| / 127, the
    activation quantization the int8 graph asks for), then each 64-byte load of an active row
    feeds four vpdpbusd whose s8 operand is that row's x_q in byte t of every dword, so
    accumulator t gathers columns 16t..16t+15 (the packing puts them there): 1 load and 4
    instructions per 64 weights instead of 4 sign-extends, 4 conversions and 4 FMAs. The u8
    codes are q + 128, taken back once per task: y = s_x * scale * sum_c (acc_c - 128 * sum_c x_q).

    Schedule: after one vectorized pass for s_x, each of ``chunks`` parallel tasks takes a range of
    input channels, lists and rounds its own active ones (so no serial compaction: 3-6 us at
    K=2816, a tenth of the call) and sums their whole rows into its own int32 partial y, 8 rows
    walked together 64 bytes at a time. ``prefetch_steps``: prefetch the rows that many steps
    ahead into L2 (``schedule.prefetch_l2``). ``listing_prefetch_lines``: while listing, per
    channel, prefetch that many more lines of the rows listed so far, in order (so the first
    rows are on their way when the walk starts; 0: none). Rows of 1-3 KB are too short for the hardware
    prefetchers, which stop at page boundaries and need a few misses to start: out of cache at
    50 %, prefetching into L2 took 57 us against 86 without (K=2816, N=1024; 1 step ahead and 2
    within noise of each other, 1 ahead of 2 in most runs); into L1 it gained half of that. Column
    panels (each thread owning 128-512 columns of every row) and walking one or two rows at a time
    were both slower. x_q uses nearbyint (round half to even, one instruction); T.round is a libm
    call per element.
    """
    unused = _mode_unused(mode)
    R, P = rows_per_step, chunks or ROW_CHUNKS
    width = panel_count(n, VNNI_BLOCK) * VNNI_BLOCK
    blocks = width // VNNI_BLOCK
    capacity = (k + P - 1) // P + R  # one task's channels, padded to whole steps
    vpdpbusd = "llvm.x86.avx512.vpdpbusd.512"
    offset = T.int32(VNNI_WEIGHT_OFFSET)
    L = VNNI_LANES
    k_vec = k // L * L

    @T.prim_func
    def int8_sparse_vnni_kernel(
        x: T.Buffer((1, k), "float32"),
        threshold: T.Buffer((1,), "float32"),
        act_scale: T.Buffer((k,), "float32"),
        wq: T.Buffer((k, width), "uint8"),
        scale: T.Buffer((width,), "float32"),
        y: T.Buffer((1, n), "float32"),
    ):
        T.func_attr({"tir.noalias": True})
        # s_x = max |x| over the active channels (vectorized)
        vmax = T.alloc_buffer((L,), "float32")
        for j in T.vectorized(L):
            vmax[j] = T.float32(0)
        for c0 in range(k_vec // L):
            for j in T.vectorized(L):
                ch = T.bind(c0 * L + j)
                vmax[j] = T.max(vmax[j], T.Select(active_expr(mode, x[0, ch], threshold, act_scale, ch),
                                                  T.abs(x[0, ch]), T.float32(0)))
        amax = T.alloc_buffer((1,), "float32")
        amax[0] = T.float32(0)
        for j in range(L):
            amax[0] = T.max(amax[0], vmax[j])
        for kk in range(k - k_vec):
            ch = T.bind(k_vec + kk)
            amax[0] = T.max(amax[0], T.Select(active_expr(mode, x[0, ch], threshold, act_scale, ch),
                                              T.abs(x[0, ch]), T.float32(0)))
        inv = T.bind(T.Select(amax[0] > T.float32(0), T.float32(127) / amax[0], T.float32(0)))
        idx = T.alloc_buffer((P, capacity), "int32")
        xb = T.alloc_buffer((P, capacity * 4), "int32")  # x_q of list entry j in byte t of xb[4j + t]
        wflat = T.decl_buffer((k * width,), "uint8", data=wq.data)
        part = T.alloc_buffer((P, width), "int32")
        for c in T.parallel(P):
            count = T.alloc_buffer((1,), "int32")
            qsum = T.alloc_buffer((1,), "int32")
            count[0] = 0
            qsum[0] = 0
            for kk in range(c * k // P, (c + 1) * k // P):  # branch-free: write, advance if active
                active = T.bind(active_expr(mode, x[0, kk], threshold, act_scale, kk))
                q = T.bind(T.Select(active, T.Cast("int32", T.nearbyint(x[0, kk] * inv)), 0))
                idx[c, count[0]] = kk
                for t in T.unroll(4):
                    xb[c, count[0] * 4 + t] = T.shift_left(T.bitwise_and(q, 255), 8 * t)
                # Line `line` of the listed rows, in order; clamped to the last one listed. Before the
                # first active channel, idx[c, 0] is this channel (written just above).
                for u in T.unroll(listing_prefetch_lines):
                    line = T.bind((kk - c * k // P) * listing_prefetch_lines + u)
                    row = T.bind(idx[c, T.min(line // blocks, T.max(count[0] - 1, 0))])
                    prefetch_l2(T.address_of(wflat[row * width + line % blocks * VNNI_BLOCK]))
                qsum[0] = qsum[0] + q
                count[0] = count[0] + T.Select(active, 1, 0)
            steps = T.bind((count[0] + R - 1) // R)
            for p in range(steps * R - count[0]):  # pad with the last row (in cache) times x_q = 0
                idx[c, count[0] + p] = idx[c, count[0] - 1]
                for t in T.unroll(4):
                    xb[c, (count[0] + p) * 4 + t] = 0
            for b in range(blocks * 4):
                part[c, T.ramp(b * L, 1, L)] = T.broadcast(T.int32(0), L)
            for s in range(steps):
                for b in range(blocks):
                    acc = T.alloc_buffer((2, 4, L), "int32")
                    for t in T.unroll(4):
                        acc[0, t, T.ramp(0, 1, L)] = part[c, T.ramp(b * VNNI_BLOCK + t * L, 1, L)]
                        acc[1, t, T.ramp(0, 1, L)] = T.broadcast(T.int32(0), L)
                    if prefetch_steps > 0:  # the same 64 bytes of a later step's rows, into L2
                        for r in T.unroll(R):
                            ahead = T.bind(idx[c, T.min((s + prefetch_steps) * R + r, steps * R - 1)])
                            prefetch_l2(T.address_of(wflat[ahead * width + b * VNNI_BLOCK]))
                    for r in T.unroll(R):
                        j = T.bind(s * R + r)
                        w64 = T.bind(wflat[T.ramp(idx[c, j] * width + b * VNNI_BLOCK, 1, VNNI_BLOCK)])
                        for t in T.unroll(4):
                            xv = T.bind(T.reinterpret("int8x64", T.broadcast(xb[c, j * 4 + t], L)))
                            acc[r % 2, t, T.ramp(0, 1, L)] = T.call_llvm_pure_intrin(
                                "int32x16", T.llvm_lookup_intrinsic_id(vpdpbusd),
                                acc[r % 2, t, T.ramp(0, 1, L)], w64, xv)
                    for t in T.unroll(4):
                        part[c, T.ramp(b * VNNI_BLOCK + t * L, 1, L)] = (
                            acc[0, t, T.ramp(0, 1, L)] + acc[1, t, T.ramp(0, 1, L)])
            correction = T.bind(offset * qsum[0])  # this task's rows carry +128 in every code
            for b in range(blocks * 4):
                part[c, T.ramp(b * L, 1, L)] = part[c, T.ramp(b * L, 1, L)] - T.broadcast(correction, L)
        sx = T.bind(amax[0] / T.float32(127))
        for b in range(blocks * 4):
            total = T.alloc_buffer((L,), "int32")
            for j in T.vectorized(L):
                total[j] = part[0, b * L + j]
            for c in range(1, P):
                for j in T.vectorized(L):
                    total[j] = total[j] + part[c, b * L + j]
            if b * L + L <= n:
                for j in T.vectorized(L):
                    y[0, b * L + j] = T.Cast("float32", total[j]) * sx * scale[b * L + j]
            else:
                for j in range(L):
                    if b * L + j < n:
                        y[0, b * L + j] = T.Cast("float32", total[j]) * sx * scale[b * L + j]

    return without_params(int8_sparse_vnni_kernel, unused)


# --------------------------------------------------------------- int4 sparse, AVX-512 VNNI

VNNI_INT4_BLOCK = 2 * VNNI_BLOCK  # output columns per 64-byte load of int4 codes


def pack_int4_sparse_vnni(codes, scales, zeros=None, *, k: int):
    """Group-wise int4 -> (rows u8 [K, Np/2], scales f32 [G, Np][, zeros f32 [G, Np]]) for
    ``int4_sparse_matmul_vnni``, Np = N rounded up to 128.

    Row k stays contiguous (only active rows are read). In each block of 128 columns (64 bytes),
    byte 4i + t holds column 16t + i in its low nibble and column 64 + 16t + i in its high
    nibble: the low and the high nibbles of one load are each ``pack_int8_sparse_vnni``'s order
    for 64 columns. Padded columns hold the zero point's code (they contribute exactly 0)."""
    codes_kn, scales_gn, zeros_gn = _int4_operands(codes, scales, zeros, k, VNNI_INT4_BLOCK // 2)
    width = codes_kn.shape[1]
    halves = codes_kn.reshape(k, width // VNNI_INT4_BLOCK, 2, 4, VNNI_LANES)  # [k, b, half, t, i]
    ordered = halves.transpose(0, 1, 2, 4, 3).reshape(k, width // VNNI_INT4_BLOCK, 2, VNNI_BLOCK)
    rows = (ordered[:, :, 0] | (ordered[:, :, 1] << 4)).astype(np.uint8).reshape(k, width // 2)
    out = [np.ascontiguousarray(rows), scales_gn]
    if zeros_gn is not None:
        out.append(zeros_gn)
    return tuple(out)


def int4_sparse_matmul_vnni(k: int, n: int, group: int, mode: str = "threshold", zero_points: bool = False,
                            rows_per_step: int = X86_ROWS.rows_per_step, chunks: int | None = None,
                            prefetch_steps: int = X86_ROWS.prefetch_steps):
    """Batch-1 sparse-input y = x @ W for group-wise int4 W on x86 with AVX-512 VNNI, packed by
    ``pack_int4_sparse_vnni``.

    Signature: ``(x: f32[1, k], [threshold: f32[1]], [act_scale: f32[k]], wq: u8[k, Np/2],
    scales: f32[G, Np], [zeros: f32[G, Np]], y: f32[1, n])``.
    The active inputs are rounded to int8 per group (s_x,g = max |active x in g| / 127; with every
    input active this is ``int4_dense_matmul_vnni``'s rounding), then each 64-byte load of an
    active row is split into its low and high nibbles (an AND and a shift) and feeds eight
    vpdpbusd whose s8 operand is that row's x_q in byte t of every dword: accumulator t gathers
    columns 16t .. 16t + 15 of the block (the packing puts them there). Per group the int32 sums
    become y += scale * s_x,g * (sum - zero * sum x_q). The float kernel (``int4_sparse_matmul``)
    spends an unpack, two conversions and two FMAs per 32 weights instead.

    Schedule (as ``int8_sparse_matmul_vnni``): each of ``chunks`` parallel tasks takes a range of
    whole groups, lists and rounds its own active channels (each group's list padded to whole
    steps of ``rows_per_step`` rows, so a step never straddles a group), walks the rows a step
    at a time 64 bytes at a time into an int32 partial, prefetching ``prefetch_steps`` steps
    ahead into L2, and folds the partial into its float partial y at the end of each group.
    """
    if group % (2 * VNNI_LANES):
        raise ValueError(f"group must be a multiple of {2 * VNNI_LANES}, got {group}")
    unused = _mode_unused(mode) | (set() if zero_points else {"zeros"})
    R, L = rows_per_step, VNNI_LANES
    G = group_count(k, group)
    P = max(1, min(chunks or ROW_CHUNKS, G))
    width = panel_count(n, VNNI_INT4_BLOCK) * VNNI_INT4_BLOCK
    blocks, row_bytes = width // VNNI_INT4_BLOCK, width // 2
    task_groups = -(-G // P)
    max_steps = task_groups * -(-group // R)
    capacity = max_steps * R
    vectors = width // L
    vpdpbusd = "llvm.x86.avx512.vpdpbusd.512"
    sym_zero = T.float32(INT4_SYMMETRIC_ZERO)
    sum_partials = _sum_partials_macro(n, L, P)  # y = the tasks' float partials, summed

    @T.prim_func
    def int4_sparse_vnni_kernel(
        x: T.Buffer((1, k), "float32"),
        threshold: T.Buffer((1,), "float32"),
        act_scale: T.Buffer((k,), "float32"),
        wq: T.Buffer((k, row_bytes), "uint8"),
        scales: T.Buffer((G, width), "float32"),
        zeros: T.Buffer((G, width), "float32"),
        y: T.Buffer((1, n), "float32"),
    ):
        T.func_attr({"tir.noalias": True})
        sx = T.alloc_buffer((G,), "float32")
        inv = T.alloc_buffer((G,), "float32")
        for g in range(G):  # s_x,g = max |x| over the group's active channels (16 lanes at a time)
            vmax = T.alloc_buffer((L,), "float32")
            amax = T.alloc_buffer((1,), "float32")
            for j in T.vectorized(L):
                vmax[j] = T.float32(0)
            for c0 in range(group // L):
                base = T.bind(g * group + c0 * L)
                if base + L <= k:
                    for j in T.vectorized(L):
                        vmax[j] = T.max(vmax[j], T.Select(active_expr(mode, x[0, base + j], threshold, act_scale,
                                                                      base + j), T.abs(x[0, base + j]), T.float32(0)))
                else:
                    for j in range(L):
                        if base + j < k:
                            vmax[j] = T.max(vmax[j], T.Select(active_expr(mode, x[0, base + j], threshold, act_scale,
                                                                          base + j), T.abs(x[0, base + j]),
                                                              T.float32(0)))
            amax[0] = T.float32(0)
            for j in range(L):
                amax[0] = T.max(amax[0], vmax[j])
            sx[g] = amax[0] / T.float32(127)
            inv[g] = T.Select(amax[0] > T.float32(0), T.float32(127) / amax[0], T.float32(0))
        idx = T.alloc_buffer((P, capacity), "int32")
        xb = T.alloc_buffer((P, capacity * 4), "int32")  # x_q of list entry j in byte t of xb[4j + t]
        step_group = T.alloc_buffer((P, max_steps), "int32")
        group_qsum = T.alloc_buffer((P, task_groups), "int32")
        part = T.alloc_buffer((P, width), "int32")
        yf = T.alloc_buffer((P, width), "float32")
        wflat = T.decl_buffer((k * row_bytes,), "uint8", data=wq.data)
        for c in T.parallel(P):
            g_lo = T.bind(c * G // P)
            count = T.alloc_buffer((1,), "int32")
            nsteps = T.alloc_buffer((1,), "int32")
            qsum = T.alloc_buffer((1,), "int32")
            count[0] = 0
            nsteps[0] = 0
            for g in range(g_lo, (c + 1) * G // P):
                start = T.bind(count[0])
                qsum[0] = 0
                for kk in range(T.min(group, k - g * group)):  # branch-free: write, advance if active
                    ch = T.bind(g * group + kk)
                    active = T.bind(active_expr(mode, x[0, ch], threshold, act_scale, ch))
                    q = T.bind(T.Select(active, T.Cast("int32", T.nearbyint(x[0, ch] * inv[g])), 0))
                    idx[c, count[0]] = ch
                    for t in T.unroll(4):
                        xb[c, count[0] * 4 + t] = T.shift_left(T.bitwise_and(q, 255), 8 * t)
                    qsum[0] = qsum[0] + q
                    count[0] = count[0] + T.Select(active, 1, 0)
                found = T.bind(count[0] - start)
                padded = T.bind((found + R - 1) // R * R)
                for p in range(padded - found):  # the group's last row again (in cache), x_q = 0
                    idx[c, count[0] + p] = idx[c, count[0] - 1]
                    for t in T.unroll(4):
                        xb[c, (count[0] + p) * 4 + t] = 0
                for st in range(padded // R):
                    step_group[c, nsteps[0] + st] = g
                group_qsum[c, g - g_lo] = qsum[0]
                count[0] = start + padded
                nsteps[0] = nsteps[0] + padded // R
            for v in range(vectors):
                part[c, T.ramp(v * L, 1, L)] = T.broadcast(T.int32(0), L)
                yf[c, T.ramp(v * L, 1, L)] = T.broadcast(T.float32(0), L)
            for s in range(nsteps[0]):
                g = T.bind(step_group[c, s])
                for b in range(blocks):
                    acc = T.alloc_buffer((2, 8, L), "int32")
                    for t in T.unroll(8):
                        acc[0, t, T.ramp(0, 1, L)] = part[c, T.ramp(b * VNNI_INT4_BLOCK + t * L, 1, L)]
                        acc[1, t, T.ramp(0, 1, L)] = T.broadcast(T.int32(0), L)
                    if prefetch_steps > 0:  # the same 64 bytes of a later step's rows, into L2
                        for r in T.unroll(R):
                            ahead = T.bind(idx[c, T.min((s + prefetch_steps) * R + r, nsteps[0] * R - 1)])
                            prefetch_l2(T.address_of(wflat[ahead * row_bytes + b * VNNI_BLOCK]))
                    for r in T.unroll(R):
                        j = T.bind(s * R + r)
                        w64 = T.bind(wflat[T.ramp(idx[c, j] * row_bytes + b * VNNI_BLOCK, 1, VNNI_BLOCK)])
                        lo = T.bind(T.bitwise_and(w64, T.broadcast(T.uint8(15), VNNI_BLOCK)))
                        hi = T.bind(T.shift_right(w64, T.broadcast(T.uint8(4), VNNI_BLOCK)))
                        for t in T.unroll(4):
                            xv = T.bind(T.reinterpret("int8x64", T.broadcast(xb[c, j * 4 + t], L)))
                            acc[r % 2, t, T.ramp(0, 1, L)] = T.call_llvm_pure_intrin(
                                "int32x16", T.llvm_lookup_intrinsic_id(vpdpbusd), acc[r % 2, t, T.ramp(0, 1, L)],
                                lo, xv)
                            acc[r % 2, 4 + t, T.ramp(0, 1, L)] = T.call_llvm_pure_intrin(
                                "int32x16", T.llvm_lookup_intrinsic_id(vpdpbusd),
                                acc[r % 2, 4 + t, T.ramp(0, 1, L)], hi, xv)
                    for t in T.unroll(8):
                        part[c, T.ramp(b * VNNI_INT4_BLOCK + t * L, 1, L)] = (
                            acc[0, t, T.ramp(0, 1, L)] + acc[1, t, T.ramp(0, 1, L)])
                if s + 1 == nsteps[0] or step_group[c, T.min(s + 1, nsteps[0] - 1)] != g:  # the group ends
                    coef = T.bind(T.Cast("float32", group_qsum[c, g - g_lo]))
                    for v in range(vectors):
                        for j in T.vectorized(L):
                            col = T.bind(v * L + j)
                            if zero_points:
                                z = T.bind(zeros[g, col])
                            else:
                                z = T.bind(sym_zero)
                            yf[c, col] = yf[c, col] + scales[g, col] * sx[g] * (
                                T.Cast("float32", part[c, col]) - z * coef)
                            part[c, col] = 0
        sum_partials(yf, y)

    return without_params(int4_sparse_vnni_kernel, unused)


# ------------------------------------------------------- int8 multi-row, AVX-512 VNNI (prompt chunks)

# Rows of x per register tile: 3 rows x 64 columns of int32 sums are 12 zmm accumulators. Measured
# (M=32, out of cache, interleaved, a shared 2-core Zen 5): 3 rows took 0.57x / 0.60x the time of 4
# rows (K=2816 N=1024 / K=1024 N=2816), 2 rows 0.69x / 0.53x, 1 row 0.97x / 1.30x.
VNNI_ROW_TILE = 3

_LOW_BYTES, _HIGH_BYTES = 0x00FF00FF, 0xFF00FF00
_LOW_HALVES, _HIGH_HALVES = 0x0000FFFF, 0xFFFF0000


def _u32(value: int):
    return T.broadcast(T.uint32(value), VNNI_LANES)


@T.macro
def transpose_dwords(wt, base, a0, a1, a2, a3):
    """wt[base .. base + 256] <- the 4 x 64 bytes a0..a3 (uint32x16, 64 columns of 4 consecutive
    input rows, in the one-row VNNI order: byte 4i + t is column 16t + i) with the bytes of each
    dword transposed: 64-byte vector t, dword i holds column 16t + i of the 4 rows (bytes 0..3),
    vpdpbusd's operand order. Shifts and masks on 16-lane int32 vectors: bytes 0/2 and 1/3 of
    each row pair, then the halves of the pairs."""
    b0 = T.bind(T.bitwise_or(T.bitwise_and(a0, _u32(_LOW_BYTES)),
                             T.bitwise_and(T.shift_left(a1, _u32(8)), _u32(_HIGH_BYTES))))
    b1 = T.bind(T.bitwise_or(T.bitwise_and(T.shift_right(a0, _u32(8)), _u32(_LOW_BYTES)),
                             T.bitwise_and(a1, _u32(_HIGH_BYTES))))
    b2 = T.bind(T.bitwise_or(T.bitwise_and(a2, _u32(_LOW_BYTES)),
                             T.bitwise_and(T.shift_left(a3, _u32(8)), _u32(_HIGH_BYTES))))
    b3 = T.bind(T.bitwise_or(T.bitwise_and(T.shift_right(a2, _u32(8)), _u32(_LOW_BYTES)),
                             T.bitwise_and(a3, _u32(_HIGH_BYTES))))
    wt[T.ramp(base, 1, VNNI_BLOCK)] = T.reinterpret("uint8x64", T.bitwise_or(
        T.bitwise_and(b0, _u32(_LOW_HALVES)), T.shift_left(b2, _u32(16))))
    wt[T.ramp(base + VNNI_BLOCK, 1, VNNI_BLOCK)] = T.reinterpret("uint8x64", T.bitwise_or(
        T.bitwise_and(b1, _u32(_LOW_HALVES)), T.shift_left(b3, _u32(16))))
    wt[T.ramp(base + 2 * VNNI_BLOCK, 1, VNNI_BLOCK)] = T.reinterpret("uint8x64", T.bitwise_or(
        T.shift_right(b0, _u32(16)), T.bitwise_and(b2, _u32(_HIGH_HALVES))))
    wt[T.ramp(base + 3 * VNNI_BLOCK, 1, VNNI_BLOCK)] = T.reinterpret("uint8x64", T.bitwise_or(
        T.shift_right(b1, _u32(16)), T.bitwise_and(b3, _u32(_HIGH_HALVES))))


def _quad_dot_macro(rows: int, kp: int):
    """T.macro(acc, wt, base, xq, row0, r4): acc[r, t] += the 4 input rows 4 r4 .. 4 r4 + 3 of the
    transposed panel vectors t = 0..3 at wt[base + 64 t] (``transpose_dwords``' order) times those
    rows' x_q of row row0 + r of x (kp int8 per row): one vpdpbusd of 64 products per vector and row."""
    L = VNNI_LANES
    vpdpbusd = "llvm.x86.avx512.vpdpbusd.512"

    @T.macro
    def quad_dot(acc, wt, base, xq, row0, r4):
        w0 = T.bind(wt[T.ramp(base, 1, VNNI_BLOCK)])
        w1 = T.bind(wt[T.ramp(base + VNNI_BLOCK, 1, VNNI_BLOCK)])
        w2 = T.bind(wt[T.ramp(base + 2 * VNNI_BLOCK, 1, VNNI_BLOCK)])
        w3 = T.bind(wt[T.ramp(base + 3 * VNNI_BLOCK, 1, VNNI_BLOCK)])
        for r in T.unroll(rows):
            xv = T.bind(T.reinterpret("int8x64", T.broadcast(
                T.reinterpret("int32", xq[T.ramp((row0 + r) * kp + r4 * 4, 1, 4)]), L)))
            acc[r, 0, T.ramp(0, 1, L)] = T.call_llvm_pure_intrin(
                "int32x16", T.llvm_lookup_intrinsic_id(vpdpbusd), acc[r, 0, T.ramp(0, 1, L)], w0, xv)
            acc[r, 1, T.ramp(0, 1, L)] = T.call_llvm_pure_intrin(
                "int32x16", T.llvm_lookup_intrinsic_id(vpdpbusd), acc[r, 1, T.ramp(0, 1, L)], w1, xv)
            acc[r, 2, T.ramp(0, 1, L)] = T.call_llvm_pure_intrin(
                "int32x16", T.llvm_lookup_intrinsic_id(vpdpbusd), acc[r, 2, T.ramp(0, 1, L)], w2, xv)
            acc[r, 3, T.ramp(0, 1, L)] = T.call_llvm_pure_intrin(
                "int32x16", T.llvm_lookup_intrinsic_id(vpdpbusd), acc[r, 3, T.ramp(0, 1, L)], w3, xv)

    return quad_dot


def _vnni_row_tasks(blocks: int) -> int:
    """Parallel tasks of the multi-row kernel: one per hardware thread (at least ROW_CHUNKS), each
    taking whole 64-column blocks."""
    import os

    return max(1, min(blocks, max(ROW_CHUNKS, os.cpu_count() or 1)))


def int8_vnni_rows_matmul(m: int, k: int, n: int, row_tile: int = VNNI_ROW_TILE, chunks: int | None = None):
    """Multi-row y = x @ (q * scale) over ``pack_int8_sparse_vnni``'s layout (the one-row VNNI
    kernel's weights, read whole: every input counts). The prompt-chunk form of
    ``int8_sparse_matmul_vnni``.

    Signature: ``(x: f32[m, k], wq: u8[k, Np], scale: f32[Np], y: f32[m, n])``.
    Numerics as the one-row kernel's, row by row: x_q = nearbyint(x * 127 / max|x|) per row, an
    exact int32 product with the u8 codes (q + 128), y = (acc - 128 * sum x_q) * s_x * scale, so
    a row whose inputs are all active gives the one-row kernel's result bit for bit.

    Schedule: the layout keeps 4 columns of one input row in a dword, where vpdpbusd sums 4
    products of a dword: it needs 4 input rows of one column there. So each parallel task takes
    whole 64-column blocks; per block it first transposes bytes inside the dwords of every 4
    consecutive rows (shifts and masks on 16-lane int32 vectors, into a per-task scratch panel of
    K x 64 bytes that stays in L2), then walks the rows of x ``row_tile`` at a time over the
    panel: per 4 input rows, 4 panel loads shared by the tile and 4 vpdpbusd per row of x, each
    64 useful products (the one-row kernel's vpdpbusd carry 16). The transposition is paid once
    per weight byte, not per row of x. Prefetching W 8, 16 or 32 rows ahead of the transposition
    was no faster than none (medians 0.6-1.2x of none, a shared machine): none. ``chunks``:
    parallel tasks (default: the compiling machine's hardware threads, at least ROW_CHUNKS). The
    rows of x are rounded in parallel too: at M=32, out of cache, interleaved, the chunk took
    1/1.16 and 1/1.04 of the time a serial rounding loop took (K=2816 N=1024 / K=1024 N=2816).
    """
    width = panel_count(n, VNNI_BLOCK) * VNNI_BLOCK
    blocks = width // VNNI_BLOCK
    kp = (k + 3) // 4 * 4  # input rows padded to whole dwords (x_q = 0 there)
    quads = kp // 4
    P = chunks or _vnni_row_tasks(blocks)
    panel = kp * VNNI_BLOCK  # bytes of one transposed block
    L = VNNI_LANES
    k_vec = k // L * L
    offset = T.int32(VNNI_WEIGHT_OFFSET)

    @T.macro
    def quantize_rows(x, xq, sx, qsum):
        """Per row of x: s_x = max|x| / 127, x_q = nearbyint(x / s_x) as int8, sum of x_q."""
        for i in T.parallel(m):  # in parallel: see the docstring
            vmax = T.alloc_buffer((L,), "float32")
            vsum = T.alloc_buffer((L,), "int32")
            amax = T.alloc_buffer((1,), "float32")
            total = T.alloc_buffer((1,), "int32")
            for j in T.vectorized(L):
                vmax[j] = T.float32(0)
                vsum[j] = 0
            for c0 in range(k_vec // L):
                for j in T.vectorized(L):
                    vmax[j] = T.max(vmax[j], T.abs(x[i, c0 * L + j]))
            amax[0] = T.float32(0)
            for j in range(L):
                amax[0] = T.max(amax[0], vmax[j])
            for kk in range(k - k_vec):
                amax[0] = T.max(amax[0], T.abs(x[i, k_vec + kk]))
            inv = T.bind(T.Select(amax[0] > T.float32(0), T.float32(127) / amax[0], T.float32(0)))
            sx[i] = amax[0] / T.float32(127)
            for c0 in range(k_vec // L):
                for j in T.vectorized(L):  # (a T.bind here was vectorized as the last lane's value)
                    xq[i * kp + c0 * L + j] = T.Cast("int8", T.nearbyint(x[i, c0 * L + j] * inv))
                    vsum[j] = vsum[j] + T.Cast("int32", xq[i * kp + c0 * L + j])
            total[0] = 0
            for j in range(L):
                total[0] = total[0] + vsum[j]
            for kk in range(k - k_vec):
                q = T.bind(T.Cast("int32", T.nearbyint(x[i, k_vec + kk] * inv)))
                xq[i * kp + k_vec + kk] = T.Cast("int8", q)
                total[0] = total[0] + q
            for kk in range(kp - k):
                xq[i * kp + k + kk] = T.int8(0)
            qsum[i] = total[0]

    @T.macro
    def transpose_block(wflat, wt, c, b):
        """wt[c] <- block b of W, 4 rows at a time (``transpose_dwords``)."""
        for r4 in range(quads):
            transpose_dwords(wt, c * panel + r4 * 4 * VNNI_BLOCK,
                             *[T.reinterpret("uint32x16", wflat[T.ramp(T.min(r4 * 4 + u, k - 1) * width
                                                                       + b * VNNI_BLOCK, 1, VNNI_BLOCK)])
                               for u in range(4)])

    def tile_macro(rows: int):
        quad_dot = _quad_dot_macro(rows, kp)

        @T.macro
        def tile(wt, xq, sx, qsum, scale, y, c, b, row0):
            """Rows row0 .. row0 + rows of block b: int32 sums in registers over the whole panel."""
            acc = T.alloc_buffer((rows, 4, L), "int32")
            for r in T.unroll(rows):
                for t in T.unroll(4):
                    acc[r, t, T.ramp(0, 1, L)] = T.broadcast(T.int32(0), L)
            for r4 in range(quads):
                quad_dot(acc, wt, c * panel + r4 * 4 * VNNI_BLOCK, xq, row0, r4)
            for r in T.unroll(rows):
                i = T.bind(row0 + r)
                correction = T.bind(offset * qsum[i])  # every code carries +128
                for t in T.unroll(4):
                    col0 = T.bind(b * VNNI_BLOCK + t * L)
                    if col0 + L <= n:
                        for j in T.vectorized(L):
                            y[i, col0 + j] = T.Cast("float32", acc[r, t, j] - correction) * sx[i] * scale[col0 + j]
                    else:
                        for j in range(L):
                            if col0 + j < n:
                                y[i, col0 + j] = T.Cast("float32", acc[r, t, j] - correction) * sx[i] * scale[col0 + j]

        return tile

    full_tiles, rest = divmod(m, row_tile)
    full_tile = tile_macro(row_tile)
    last_tile = tile_macro(max(rest, 1))

    @T.prim_func
    def int8_vnni_rows_kernel(
        x: T.Buffer((m, k), "float32"),
        wq: T.Buffer((k, width), "uint8"),
        scale: T.Buffer((width,), "float32"),
        y: T.Buffer((m, n), "float32"),
    ):
        T.func_attr({"tir.noalias": True})
        xq = T.alloc_buffer((m * kp,), "int8")
        sx = T.alloc_buffer((m,), "float32")
        qsum = T.alloc_buffer((m,), "int32")
        wt = T.alloc_buffer((P * panel,), "uint8")
        wflat = T.decl_buffer((k * width,), "uint8", data=wq.data)
        quantize_rows(x, xq, sx, qsum)
        for c in T.parallel(P):
            for b in range(c * blocks // P, (c + 1) * blocks // P):
                transpose_block(wflat, wt, c, b)
                for tile in range(full_tiles):
                    full_tile(wt, xq, sx, qsum, scale, y, c, b, tile * row_tile)
                if rest > 0:
                    last_tile(wt, xq, sx, qsum, scale, y, c, b, full_tiles * row_tile)

    return int8_vnni_rows_kernel


# ------------------------------------------------------- int4 multi-row, AVX-512 VNNI (prompt chunks)

_LOW_NIBBLES = 0x0F0F0F0F


def int4_vnni_rows_matmul(m: int, k: int, n: int, group: int, zero_points: bool = False,
                          row_tile: int = VNNI_ROW_TILE, chunks: int | None = None):
    """Multi-row y = x @ W over ``pack_int4_sparse_vnni``'s layout (the one-row int4 VNNI kernel's
    weights, read whole: every input counts). The prompt-chunk form of ``int4_sparse_matmul_vnni``.

    Signature: ``(x: f32[m, k], wq: u8[k, Np/2], scales: f32[G, Np], [zeros: f32[G, Np]], y: f32[m, n])``.
    Numerics as the one-row kernel's, row by row: x_q = nearbyint(x * 127 / max|x in g|) per row
    and group, exact int32 products with the codes, y += scale * s_x,g * (sum - zero * sum x_q).

    Schedule (as ``int8_vnni_rows_matmul``): each parallel task takes whole 128-column blocks; per
    block it splits every 64-byte row load into its low and high nibbles (64 columns each, the
    one-row order) and transposes the bytes inside the dwords of every 4 rows
    (``transpose_dwords``) into a per-task panel of 2 x Kp x 64 bytes (L2), then walks the rows
    of x ``row_tile`` at a time over each half: per 4 input rows, 4 panel loads shared by the
    tile and 4 vpdpbusd per row of x with 64 useful products each; the int32 sums are folded into
    float per group (the group's scale).
    """
    if group % (2 * VNNI_LANES):
        raise ValueError(f"group must be a multiple of {2 * VNNI_LANES}, got {group}")
    width = panel_count(n, VNNI_INT4_BLOCK) * VNNI_INT4_BLOCK
    blocks, row_bytes = width // VNNI_INT4_BLOCK, width // 2
    G = group_count(k, group)
    kp = G * group
    group_quads = group // 4
    P = chunks or _vnni_row_tasks(blocks)
    panel = kp * VNNI_BLOCK  # bytes of one transposed half block
    L = VNNI_LANES
    sym_zero = T.float32(INT4_SYMMETRIC_ZERO)

    @T.macro
    def quantize_groups(x, xq, sx, qsum):
        """Per row of x and group: s_x = max|x| / 127, x_q = nearbyint(x / s_x) as int8, sum of x_q."""
        for i in T.parallel(m):
            for g in range(G):
                vmax = T.alloc_buffer((L,), "float32")
                vsum = T.alloc_buffer((L,), "int32")
                amax = T.alloc_buffer((1,), "float32")
                total = T.alloc_buffer((1,), "int32")
                for j in T.vectorized(L):
                    vmax[j] = T.float32(0)
                    vsum[j] = 0
                for c0 in range(group // L):
                    base = T.bind(g * group + c0 * L)
                    if base + L <= k:
                        for j in T.vectorized(L):
                            vmax[j] = T.max(vmax[j], T.abs(x[i, base + j]))
                    else:
                        for j in range(L):
                            if base + j < k:
                                vmax[j] = T.max(vmax[j], T.abs(x[i, base + j]))
                amax[0] = T.float32(0)
                for j in range(L):
                    amax[0] = T.max(amax[0], vmax[j])
                inv = T.bind(T.Select(amax[0] > T.float32(0), T.float32(127) / amax[0], T.float32(0)))
                sx[i, g] = amax[0] / T.float32(127)
                for c0 in range(group // L):
                    base = T.bind(g * group + c0 * L)
                    if base + L <= k:
                        for j in T.vectorized(L):
                            xq[i * kp + base + j] = T.Cast("int8", T.nearbyint(x[i, base + j] * inv))
                            vsum[j] = vsum[j] + T.Cast("int32", xq[i * kp + base + j])
                    else:
                        for j in range(L):
                            xq[i * kp + base + j] = T.Select(
                                base + j < k, T.Cast("int8", T.nearbyint(x[i, T.min(base + j, k - 1)] * inv)),
                                T.int8(0))
                            vsum[j] = vsum[j] + T.Cast("int32", xq[i * kp + base + j])
                total[0] = 0
                for j in range(L):
                    total[0] = total[0] + vsum[j]
                qsum[i, g] = total[0]

    @T.macro
    def transpose_block(wflat, wt, c, b):
        """wt[c] <- block b of W: low nibbles (columns 0..63) in the first panel, high in the second."""
        for r4 in range(kp // 4):
            a = [T.reinterpret("uint32x16", wflat[T.ramp(T.min(r4 * 4 + u, k - 1) * row_bytes + b * VNNI_BLOCK,
                                                         1, VNNI_BLOCK)]) for u in range(4)]
            transpose_dwords(wt, c * 2 * panel + r4 * 4 * VNNI_BLOCK,
                             *[T.bitwise_and(v, _u32(_LOW_NIBBLES)) for v in a])
            transpose_dwords(wt, c * 2 * panel + panel + r4 * 4 * VNNI_BLOCK,
                             *[T.bitwise_and(T.shift_right(v, _u32(4)), _u32(_LOW_NIBBLES)) for v in a])

    def tile_macro(rows: int):
        quad_dot = _quad_dot_macro(rows, kp)

        @T.macro
        def tile(wt, xq, sx, qsum, scales, zeros, y, c, b, half, row0):
            """Rows row0 .. row0 + rows, 64 columns (one half of block b): int32 sums per group in
            registers, folded into float sums with the group's scale."""
            acc = T.alloc_buffer((rows, 4, L), "int32")
            yacc = T.alloc_buffer((rows, 4, L), "float32")
            for r in T.unroll(rows):
                for t in T.unroll(4):
                    yacc[r, t, T.ramp(0, 1, L)] = T.broadcast(T.float32(0), L)
            for g in range(G):
                for r in T.unroll(rows):
                    for t in T.unroll(4):
                        acc[r, t, T.ramp(0, 1, L)] = T.broadcast(T.int32(0), L)
                for q4 in range(group_quads):
                    r4 = T.bind(g * group_quads + q4)
                    quad_dot(acc, wt, c * 2 * panel + half * panel + r4 * 4 * VNNI_BLOCK, xq, row0, r4)
                for r in T.unroll(rows):
                    i = T.bind(row0 + r)
                    coef = T.bind(T.Cast("float32", qsum[i, g]))
                    for t in T.unroll(4):
                        for j in T.vectorized(L):
                            col = T.bind(b * VNNI_INT4_BLOCK + half * VNNI_BLOCK + t * L + j)
                            if zero_points:
                                z = T.bind(zeros[g, col])
                            else:
                                z = T.bind(sym_zero)
                            yacc[r, t, j] = yacc[r, t, j] + scales[g, col] * sx[i, g] * (
                                T.Cast("float32", acc[r, t, j]) - z * coef)
            for r in T.unroll(rows):
                for t in T.unroll(4):
                    col0 = T.bind(b * VNNI_INT4_BLOCK + half * VNNI_BLOCK + t * L)
                    if col0 + L <= n:
                        for j in T.vectorized(L):
                            y[row0 + r, col0 + j] = yacc[r, t, j]
                    else:
                        for j in range(L):
                            if col0 + j < n:
                                y[row0 + r, col0 + j] = yacc[r, t, j]

        return tile

    full_tiles, rest = divmod(m, row_tile)
    full_tile = tile_macro(row_tile)
    last_tile = tile_macro(max(rest, 1))

    @T.prim_func
    def int4_vnni_rows_kernel(
        x: T.Buffer((m, k), "float32"),
        wq: T.Buffer((k, row_bytes), "uint8"),
        scales: T.Buffer((G, width), "float32"),
        zeros: T.Buffer((G, width), "float32"),
        y: T.Buffer((m, n), "float32"),
    ):
        T.func_attr({"tir.noalias": True})
        xq = T.alloc_buffer((m * kp,), "int8")
        sx = T.alloc_buffer((m, G), "float32")
        qsum = T.alloc_buffer((m, G), "int32")
        wt = T.alloc_buffer((P * 2 * panel,), "uint8")
        wflat = T.decl_buffer((k * row_bytes,), "uint8", data=wq.data)
        quantize_groups(x, xq, sx, qsum)
        for c in T.parallel(P):
            for b in range(c * blocks // P, (c + 1) * blocks // P):
                transpose_block(wflat, wt, c, b)
                for half in range(2):
                    for tile in range(full_tiles):
                        full_tile(wt, xq, sx, qsum, scales, zeros, y, c, b, half, tile * row_tile)
                    if rest > 0:
                        last_tile(wt, xq, sx, qsum, scales, zeros, y, c, b, half, full_tiles * row_tile)

    return without_params(int4_vnni_rows_kernel, set() if zero_points else {"zeros"})
