"""Sparse-input matmul y = x @ W that reads only the rows W[k, :] of active inputs.

W stays in the ONNX layout [K, N] (row k is contiguous: exactly the data an active
input channel k needs). The kernel, in one call:

1. compacts the active channels serially (branch-free): ``idx`` lists them and
   ``xa[m, j]`` holds x[m, idx[j]] (0 for a row m where that channel is inactive;
   a channel is read when it is active in any of the M rows);
2. pads the list to a multiple of ``rows_per_step`` with copies of the last active
   row and zero coefficients (those rows are already in cache, so padding is free);
3. splits the output columns into chunks over threads (batch 1: splits the active list, see
   ``accumulate_rows_macro``); per step of
   ``rows_per_step`` active rows (default 16, measured best of 4/8/16/32; at batch 1 the target's
   ``schedule.RowSchedule``: on x86 8, with an L2 prefetch) it loads a register block of y, FMAs all those rows
   into it and stores it once (measured: one row per step fell to half the
   bandwidth). Columns past the last full vector block are done serially at the end.

Activity tests: ``threshold`` |x| > t; ``scaled`` |x| * scale[k] > t (WINA);
``nonzero`` x != 0 (input already sparse, e.g. after ReLU).
"""

from __future__ import annotations

import os

from tvm.script import tirx as T

from actsparse.codegen.kernels.activity import active_expr, check_mode
from actsparse.codegen.kernels.cpu.dense import DEFAULT_LANES
from actsparse.codegen.kernels.cpu.schedule import X86_ROWS, RowSchedule, prefetch_l2
from actsparse.codegen.kernels.params import without_params

def column_block(m: int, lanes: int) -> int:
    """Width of the register block of y: two vectors for up to 4 rows, one beyond."""
    return lanes * 2 if m <= 4 else lanes


def default_chunks(m: int, n: int, block: int, threads: int | None = None) -> int:
    """Column chunks (parallel tasks): up to ~16 KB of y each (stays in L1), a multiple
    of the thread count (default: this machine's) so the static split is even.
    Measured (K=2048, N=5632, 2 cores): one chunk per thread beat finer chunks."""
    threads = threads or os.cpu_count() or 1
    full_blocks = n // block
    if full_blocks == 0:
        return 1
    cols_per_chunk = max(block, 4096 // m)
    chunks = -(-full_blocks * block // cols_per_chunk)
    chunks = threads * -(-chunks // threads)
    return max(1, min(full_blocks, chunks))


def compact_macro(mode: str, m: int, k: int, rows_per_step: int):
    """T.macro(x, threshold, scale, idx, xa, count): list the active channels of x[m, k].

    Fills idx[0:count] and xa[:, 0:count], then pads both to a multiple of
    ``rows_per_step`` (idx, xa need capacity k + rows_per_step).
    """
    R = rows_per_step

    @T.macro
    def compact(x, threshold, scale, idx, xa, count):
        count[0] = 0
        for kk in range(k):
            hit = T.alloc_buffer((1,), "int32")
            hit[0] = 0
            for i in T.unroll(m):
                active = T.bind(active_expr(mode, x[i, kk], threshold, scale, kk))
                xa[i, count[0]] = T.Select(active, x[i, kk], T.float32(0))
                hit[0] = T.max(hit[0], T.Select(active, 1, 0))
            idx[count[0]] = kk
            count[0] = count[0] + hit[0]
        pad_macro(m, R)(idx, xa, count)

    return compact


def pad_macro(m: int, rows_per_step: int):
    """T.macro(idx, xa, count): pad the active list to whole steps with the last
    active row (already in cache) and zero coefficients."""
    R = rows_per_step

    @T.macro
    def pad(idx, xa, count):
        nnz = T.bind(count[0])
        for p in range((nnz + R - 1) // R * R - nnz):
            idx[nnz + p] = idx[nnz - 1]
            for i in T.unroll(m):
                xa[i, nnz + p] = T.float32(0)

    return pad


ROWS_PER_STEP = 16


def default_rows_per_step(m: int, schedule: RowSchedule = X86_ROWS) -> int:
    return schedule.rows_per_step if m == 1 else ROWS_PER_STEP


ROW_CHUNKS = 4  # parallel tasks of the batch-1 (row-split) schedule: a multiple of 1, 2 or 4 cores


def accumulate_macro(m: int, n: int, rows_per_step: int, lanes: int, chunks: int | None,
                     schedule: RowSchedule = X86_ROWS):
    """T.macro(w, y, idx, xa, count): y[m, n] = sum_j xa[:, j] * w[idx[j], :] over the
    padded active list (see module docstring for the schedule; batch 1 splits the list instead)."""
    if m == 1:
        return accumulate_rows_macro(n, rows_per_step, lanes, chunks or ROW_CHUNKS, schedule=schedule)
    R = rows_per_step
    cb = column_block(m, lanes)
    full_blocks = n // cb
    tail_start = full_blocks * cb
    P = chunks or default_chunks(m, n, cb)

    @T.macro
    def accumulate(w, y, idx, xa, count):
        steps = T.bind((count[0] + R - 1) // R)
        for c in T.parallel(P):
            lo = T.bind(c * full_blocks // P)
            hi = T.bind((c + 1) * full_blocks // P)
            for b in range(lo, hi):
                for i in T.unroll(m):
                    for j in T.vectorized(cb):
                        y[i, b * cb + j] = T.float32(0)
            for s in range(steps):
                for b in range(lo, hi):
                    acc = T.alloc_buffer((m, cb), "float32")
                    for i in T.unroll(m):
                        for j in T.vectorized(cb):
                            acc[i, j] = y[i, b * cb + j]
                    for r in T.unroll(R):
                        row = T.bind(idx[s * R + r])
                        for i in T.unroll(m):
                            coef = T.bind(xa[i, s * R + r])
                            for j in T.vectorized(cb):
                                acc[i, j] = acc[i, j] + coef * w[row, b * cb + j]
                    for i in T.unroll(m):
                        for j in T.vectorized(cb):
                            y[i, b * cb + j] = acc[i, j]
        for i in range(m):
            for j in range(n - tail_start):
                y[i, tail_start + j] = T.float32(0)
                for a in range(count[0]):
                    y[i, tail_start + j] = y[i, tail_start + j] + xa[i, a] * w[idx[a], tail_start + j]

    return accumulate


def _row_steps_macro(n: int, rows_per_step: int, lanes: int, prefetch_steps: int, element_bytes: int):
    """T.macro(w, part, c, idx, xa, sel, s_lo, s_hi, last): part[c, :] += the rows idx[sel, j] of w
    times xa[sel, j] for the list entries j of steps s_lo .. s_hi - 1 (``rows_per_step`` rows each,
    walked together in register blocks of 2 x ``lanes`` columns), prefetching later steps' rows
    into L2 (entries past ``last`` clamp to it)."""
    R = rows_per_step
    cb = 2 * lanes
    blocks = n // cb
    tail = n - blocks * cb
    line_elems = 64 // element_bytes
    lines_per_block = max(1, cb // line_elems)

    @T.macro
    def row_steps(w, part, c, idx, xa, sel, s_lo, s_hi, last):
        for s in range(s_lo, s_hi):
            for b in range(blocks):
                acc = T.alloc_buffer((2, cb), "float32")
                for j in T.vectorized(cb):
                    acc[0, j] = part[c, b * cb + j]
                    acc[1, j] = T.float32(0)
                if prefetch_steps > 0:  # the same bytes of a later step's rows, into L2
                    for r in T.unroll(R):
                        ahead = T.bind(idx[sel, T.min((s + prefetch_steps) * R + r, last)])
                        for line in T.unroll(lines_per_block):
                            prefetch_l2(T.address_of(w[ahead, b * cb + line * line_elems]))
                for r in T.unroll(R):
                    row = T.bind(idx[sel, s * R + r])
                    coef = T.bind(xa[sel, s * R + r])
                    for j in T.vectorized(cb):  # the cast reads int8 weights too (quant.py)
                        acc[r % 2, j] = acc[r % 2, j] + coef * T.Cast("float32", w[row, b * cb + j])
                for j in T.vectorized(cb):
                    part[c, b * cb + j] = acc[0, j] + acc[1, j]
            for t in range(tail):
                for r in range(R):
                    part[c, blocks * cb + t] = part[c, blocks * cb + t] + xa[sel, s * R + r] * T.Cast(
                        "float32", w[idx[sel, s * R + r], blocks * cb + t])

    return row_steps


def _sum_partials_macro(n: int, lanes: int, chunks: int):
    """T.macro(part, y): y[0, :] = sum over tasks c of part[c, :]."""
    P = chunks
    cb = 2 * lanes
    blocks = n // cb
    tail = n - blocks * cb

    @T.macro
    def sum_partials(part, y):
        for b in range(blocks):
            total = T.alloc_buffer((cb,), "float32")
            for j in T.vectorized(cb):
                total[j] = part[0, b * cb + j]
            for c in range(1, P):
                for j in T.vectorized(cb):
                    total[j] = total[j] + part[c, b * cb + j]
            for j in T.vectorized(cb):
                y[0, b * cb + j] = total[j]
        for t in range(tail):
            y[0, blocks * cb + t] = part[0, blocks * cb + t]
            for c in range(1, P):
                y[0, blocks * cb + t] = y[0, blocks * cb + t] + part[c, blocks * cb + t]

    return sum_partials


def accumulate_rows_macro(n: int, rows_per_step: int, lanes: int, chunks: int, prefetch_steps: int | None = None,
                          element_bytes: int = 4, schedule: RowSchedule = X86_ROWS):
    """Batch 1: T.macro(w, y, idx, xa, count) splitting the active list (whole steps of rows)
    over ``chunks`` tasks, each summing whole rows into its own partial y; the partials are added
    at the end. Whole rows read by one thread beat half rows read by two when rows are short
    (int8 rows of 1 KB: 1.6x; fp32 rows of 4-11 KB: 5-9 %). For a list the kernel builds itself
    from x, ``compact_accumulate_rows_macro`` lists in parallel too."""
    R, P = rows_per_step, chunks
    prefetch_steps = schedule.prefetch_steps if prefetch_steps is None else prefetch_steps
    row_steps = _row_steps_macro(n, R, lanes, prefetch_steps, element_bytes)
    sum_partials = _sum_partials_macro(n, lanes, P)

    @T.macro
    def accumulate(w, y, idx, xa, count):
        part = T.alloc_buffer((P, n), "float32")
        steps = T.bind((count[0] + R - 1) // R)
        listed = T.decl_buffer((1, idx.shape[0]), "int32", data=idx.data)
        for c in T.parallel(P):
            for j in range(n):
                part[c, j] = T.float32(0)
            row_steps(w, part, c, listed, xa, 0, c * steps // P, (c + 1) * steps // P, steps * R - 1)
        sum_partials(part, y)

    return accumulate


def compact_accumulate_rows_macro(mode: str, k: int, n: int, rows_per_step: int, lanes: int, chunks: int,
                                  prefetch_steps: int | None = None, element_bytes: int = 4,
                                  schedule: RowSchedule = X86_ROWS):
    """Batch 1: T.macro(x, threshold, scale, w, y): y = sum over active k of x[0, k] * w[k, :], with
    the input channels split into ``chunks`` ranges, one per parallel task: each task lists its own
    range's active channels (no serial compaction of all k first) and sums their whole rows into
    its own partial y, as ``accumulate_rows_macro``. A range's share of the active rows follows
    the input; with activity spread over the channels (sparsified activations) the ranges stay
    close to even."""
    R, P = rows_per_step, chunks
    prefetch_steps = schedule.prefetch_steps if prefetch_steps is None else prefetch_steps
    capacity = (k + P - 1) // P + R
    row_steps = _row_steps_macro(n, R, lanes, prefetch_steps, element_bytes)
    sum_partials = _sum_partials_macro(n, lanes, P)

    @T.macro
    def compact_accumulate(x, threshold, scale, w, y):
        part = T.alloc_buffer((P, n), "float32")
        idx = T.alloc_buffer((P, capacity), "int32")
        xa = T.alloc_buffer((P, capacity), "float32")
        for c in T.parallel(P):
            count = T.alloc_buffer((1,), "int32")
            count[0] = 0
            for kk in range(c * k // P, (c + 1) * k // P):  # branch-free: write, advance if active
                active = T.bind(active_expr(mode, x[0, kk], threshold, scale, kk))
                xa[c, count[0]] = x[0, kk]
                idx[c, count[0]] = kk
                count[0] = count[0] + T.Select(active, 1, 0)
            steps = T.bind((count[0] + R - 1) // R)
            for p in range(steps * R - count[0]):  # pad with the last row (in cache) times 0
                idx[c, count[0] + p] = idx[c, count[0] - 1]
                xa[c, count[0] + p] = T.float32(0)
            for j in range(n):
                part[c, j] = T.float32(0)
            row_steps(w, part, c, idx, xa, c, 0, steps, steps * R - 1)
        sum_partials(part, y)

    return compact_accumulate


def batch1_rows_macro(mode: str, k: int, n: int, rows_per_step: int, lanes: int, chunks: int,
                      element_bytes: int = 4, schedule: RowSchedule = X86_ROWS):
    """Batch 1: T.macro(x, threshold, scale, w, y) = sum over active k of x[0, k] * w[k, :], in the
    target's ``RowSchedule``: per-task lists (``compact_accumulate_rows_macro``) or one serial list
    split over the tasks (``compact_macro`` + ``accumulate_rows_macro``)."""
    if schedule.task_lists:
        return compact_accumulate_rows_macro(mode, k, n, rows_per_step, lanes, chunks, element_bytes=element_bytes,
                                             schedule=schedule)
    accumulate = accumulate_rows_macro(n, rows_per_step, lanes, chunks, element_bytes=element_bytes, schedule=schedule)
    return _listed_macro(mode, 1, k, rows_per_step, accumulate)


def _listed_macro(mode: str, m: int, k: int, rows_per_step: int, accumulate):
    """T.macro(x, threshold, scale, w, y): one serial list of the active channels of x[m, k]
    (``compact_macro``), then ``accumulate(w, y, idx, xa, count)`` over it."""
    capacity = k + rows_per_step
    compact = compact_macro(mode, m, k, rows_per_step)

    @T.macro
    def listed(x, threshold, scale, w, y):
        idx = T.alloc_buffer((capacity,), "int32")
        xa = T.alloc_buffer((m, capacity), "float32")
        count = T.alloc_buffer((1,), "int32")
        compact(x, threshold, scale, idx, xa, count)
        accumulate(w, y, idx, xa, count)

    return listed


def _sparse_matmul(mode: str, m: int, k: int, n: int, rows_per_step: int, lanes: int, chunks: int | None,
                   schedule: RowSchedule):
    if m == 1:
        body = batch1_rows_macro(mode, k, n, rows_per_step, lanes, chunks or ROW_CHUNKS, schedule=schedule)
    else:
        body = _listed_macro(mode, m, k, rows_per_step, accumulate_macro(m, n, rows_per_step, lanes, chunks))

    @T.prim_func
    def sparse_matmul_kernel(
        x: T.Buffer((m, k), "float32"),
        threshold: T.Buffer((1,), "float32"),
        scale: T.Buffer((k,), "float32"),
        w: T.Buffer((k, n), "float32"),
        y: T.Buffer((m, n), "float32"),
    ):
        T.func_attr({"tir.noalias": True})
        body(x, threshold, scale, w, y)

    unused = {"nonzero": {"threshold", "scale"}, "threshold": {"scale"}, "scaled": set()}[mode]
    return without_params(sparse_matmul_kernel, unused)


def sparse_matmul(
    m: int,
    k: int,
    n: int,
    mode: str = "threshold",
    rows_per_step: int | None = None,
    lanes: int = DEFAULT_LANES,
    chunks: int | None = None,
    schedule: RowSchedule = X86_ROWS,
):
    """Sparse-input y[m, n] = sum over active k of x[m, k] * W[k, :].

    Signatures (W is the plain ONNX [K, N] weight, no packing):
      mode="threshold": ``(x: f32[m, k], threshold: f32[1], w: f32[k, n], y: f32[m, n])``
      mode="scaled":    ``(x: f32[m, k], threshold: f32[1], scale: f32[k], w: f32[k, n], y: f32[m, n])``
      mode="nonzero":   ``(x: f32[m, k], w: f32[k, n], y: f32[m, n])``
    """
    check_mode(mode)
    return _sparse_matmul(mode, m, k, n, rows_per_step or default_rows_per_step(m, schedule), lanes, chunks, schedule)
