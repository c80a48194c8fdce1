"""Fused gated FFN at batch 1: y = (act(x @ Wg) * (x @ Wu)) @ Wd, act in {silu, relu}.

x: [1, D], Wg/Wu: [D, F], Wd: [F, D] (ONNX layouts). Three sparse forms, each one
PrimFunc reading only the weight rows its active set needs:

(a) ``ffn_input_sparse``: thresholds on the FFN input (|x_d| > t_in: only rows d of
    Wg and Wu) and on the down input (|h_f| > t_down: only rows f of Wd)  - TEAL style.
(b) ``ffn_gate_sparse``: gate computed densely; up and down only for neurons with
    |act(gate_f)| > t (for relu with t = 0: relu(gate) > 0; for silu: CATS).
(c) ``ffn_indexed``: a predictor gives the active neurons (idx[0:nnz]); gate, up and
    down are computed only for them. ``predict_active`` is that predictor (the predictor
    pass's PredictActive* ops): low-rank logits, selection and compaction into idx/nnz.

Rows of W needed together are stored contiguously by the ``pack_*`` functions
(run once at compile time).
"""

from __future__ import annotations

import numpy as np
from tvm.script import tirx as T

from actsparse.codegen.kernels.cpu.dense import DEFAULT_LANES, pack_dense, panel_count
from actsparse.codegen.kernels.cpu.fastmath import sigmoid_f32
from actsparse.codegen.kernels.cpu.schedule import X86_ROWS, RowSchedule, prefetch_l2, stream_prefetch_macro
from actsparse.codegen.kernels.cpu.sparse import ROW_CHUNKS, accumulate_macro, batch1_rows_macro, pad_macro
from actsparse.codegen.kernels.params import without_params

ACTIVATIONS = ("silu", "relu")
NEURONS_PER_STEP = 4  # must divide the row schedule's rows per step


def _check_act(act: str) -> None:
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")


def _act(act: str, g):
    return g * sigmoid_f32(g) if act == "silu" else T.max(g, T.float32(0))


def panel_dot_macro(block: int, schedule: RowSchedule = X86_ROWS):
    """T.macro(v, w, p, k, acc): acc[0:block] = sum over kk < k of v[kk] * w[p, kk, :] (v 1-D), the
    panel GEMV of ``dense_matmul`` at batch 1: one contiguous stream of panel p, prefetched ahead
    as the target's schedule says (``schedule.stream_prefetch_macro``)."""
    prefetch_stream = stream_prefetch_macro(element_bytes=4, ahead_bytes=schedule.stream_prefetch_bytes)

    @T.macro
    def panel_dot(v, w, p, k, acc):
        flat = T.decl_buffer((w.shape[0] * k * block,), "float32", data=w.data)
        for j in T.vectorized(block):
            acc[j] = T.float32(0)
        for kk in range(k):
            prefetch_stream(flat, (p * k + kk) * block)
            value = T.bind(v[kk])
            for j in T.vectorized(block):
                acc[j] = acc[j] + value * w[p, kk, j]

    return panel_dot


def pack_ffn_input_sparse(wg: np.ndarray, wu: np.ndarray, wd: np.ndarray):
    """-> (wgu [D, 2F] = [Wg | Wu] so an input channel's gate and up rows are one row, wd [F, D])."""
    return np.ascontiguousarray(np.concatenate([wg, wu], axis=1), dtype=np.float32), np.ascontiguousarray(wd)


def pack_ffn_gate_sparse(wg: np.ndarray, wu: np.ndarray, wd: np.ndarray, lanes: int = DEFAULT_LANES):
    """-> (wg packed by ``pack_dense`` [ceil(F/2L), D, 2L], wu_t = Wu^T [F, D], wd [F, D])."""
    return pack_dense(wg, 2 * lanes), np.ascontiguousarray(wu.T), np.ascontiguousarray(wd)


def pack_ffn_indexed(wg: np.ndarray, wu: np.ndarray, wd: np.ndarray):
    """-> (wgu_t [F, 2, D]: neuron f's gate column then its up column, contiguous; wd [F, D])."""
    return np.ascontiguousarray(np.stack([wg.T, wu.T], axis=1)), np.ascontiguousarray(wd)


def pack_ffn_dense(wg: np.ndarray, wu: np.ndarray, wd: np.ndarray, lanes: int = DEFAULT_LANES):
    """-> (wgu [ceil(F/L), D, 2L]: panel p holds gate columns p*L .. p*L+L-1 then the same up columns,
    wd [ceil(D/2L), F, 2L] by ``pack_dense``), zero-padded."""
    d, f = wg.shape
    panels = panel_count(f, lanes)
    gate = np.zeros((d, panels * lanes), np.float32)
    up = np.zeros((d, panels * lanes), np.float32)
    gate[:, :f], up[:, :f] = wg, wu
    both = np.stack([gate.reshape(d, panels, lanes), up.reshape(d, panels, lanes)], axis=2)  # [d, p, 2, L]
    wgu = np.ascontiguousarray(both.reshape(d, panels, 2 * lanes).transpose(1, 0, 2))
    return wgu, pack_dense(np.asarray(wd, np.float32), 2 * lanes)


def ffn_dense(d: int, f: int, act: str = "silu", lanes: int = DEFAULT_LANES, residual: bool = False,
              schedule: RowSchedule = X86_ROWS):
    """Signature: ``(x: f32[1, d], wgu: f32[ceil(f/L), d, 2L], wd: f32[ceil(d/2L), f, 2L], y: f32[1, d])``,
    weights from ``pack_ffn_dense``; ``residual``: y = x + FFN(x) (the block's residual Add, one
    elementwise op and VM call less per layer).

    The dense gated FFN in one call: one panel GEMV computes a block of L neurons' gate and up
    together (one contiguous stream, as ``dense_matmul``) and writes act(gate) * up from registers;
    a second one computes down. Against gate, up, the elementwise ops and down as separate calls
    this saves one parallel region, two elementwise passes and their VM calls per layer.
    """
    _check_act(act)
    block = 2 * lanes
    panels = panel_count(f, lanes)
    out_panels = panel_count(d, block)
    panel_dot = panel_dot_macro(block, schedule)

    def plus_residual(value, xv):  # decided here, in Python: no "+ 0" in the non-residual kernel
        return value + xv if residual else value

    @T.prim_func
    def ffn_dense_kernel(
        x: T.Buffer((1, d), "float32"),
        wgu: T.Buffer((panels, d, block), "float32"),
        wd: T.Buffer((out_panels, f, block), "float32"),
        y: T.Buffer((1, d), "float32"),
    ):
        T.func_attr({"tir.noalias": True})
        h = T.alloc_buffer((panels * lanes,), "float32")
        xv = T.decl_buffer((d,), "float32", data=x.data)
        for p in T.parallel(panels):
            acc = T.alloc_buffer((block,), "float32")
            panel_dot(xv, wgu, p, d, acc)
            for j in T.vectorized(lanes):  # padded neurons: gate 0, up 0 -> h 0
                h[p * lanes + j] = _act(act, acc[j]) * acc[lanes + j]
        for b in T.parallel(out_panels):
            acc = T.alloc_buffer((block,), "float32")
            panel_dot(h, wd, b, f, acc)
            if b * block + block <= d:
                for j in T.vectorized(block):
                    y[0, b * block + j] = plus_residual(acc[j], x[0, b * block + j])
            else:
                for j in range(block):
                    if b * block + j < d:
                        y[0, b * block + j] = plus_residual(acc[j], x[0, b * block + j])

    return ffn_dense_kernel


def ffn_input_sparse(d: int, f: int, act: str = "silu", lanes: int = DEFAULT_LANES, chunks: int | None = None,
                     schedule: RowSchedule = X86_ROWS):
    """(a) Signature: ``(x: f32[1, d], t_in: f32[1], t_down: f32[1], wgu: f32[d, 2f], wd: f32[f, d], y: f32[1, d])``.

    Gate/up only over input channels with |x| > t_in; down only over neurons with |h| > t_down.
    Weights from ``pack_ffn_input_sparse``.
    """
    _check_act(act)
    R = schedule.rows_per_step  # every kernel here is batch 1
    P = chunks or ROW_CHUNKS
    # on x86 each parallel task lists its own range of input channels (then of neurons)
    up_gate = batch1_rows_macro("threshold", d, 2 * f, R, lanes, P, schedule=schedule)
    down = batch1_rows_macro("threshold", f, d, R, lanes, P, schedule=schedule)

    @T.prim_func
    def ffn_input_sparse_kernel(
        x: T.Buffer((1, d), "float32"),
        t_in: T.Buffer((1,), "float32"),
        t_down: T.Buffer((1,), "float32"),
        wgu: T.Buffer((d, 2 * f), "float32"),
        wd: T.Buffer((f, d), "float32"),
        y: T.Buffer((1, d), "float32"),
    ):
        T.func_attr({"tir.noalias": True})
        gu = T.alloc_buffer((1, 2 * f), "float32")
        h = T.alloc_buffer((1, f), "float32")
        up_gate(x, t_in, x, wgu, gu)
        for j0 in range(f // lanes):  # vectorized: a serial silu over F neurons cost ~20 us per call
            for j in T.vectorized(lanes):
                h[0, j0 * lanes + j] = _act(act, gu[0, j0 * lanes + j]) * gu[0, f + j0 * lanes + j]
        for j in range(f - f // lanes * lanes):
            h[0, f // lanes * lanes + j] = _act(act, gu[0, f // lanes * lanes + j]) * gu[0, f + f // lanes * lanes + j]
        down(h, t_down, h, wd, y)

    return ffn_input_sparse_kernel


def ffn_gate_sparse(d: int, f: int, act: str = "relu", lanes: int = DEFAULT_LANES, chunks: int | None = None,
                    shifted: bool = False, prefetch: bool | None = None, schedule: RowSchedule = X86_ROWS):
    """(b) Signature: ``(x: f32[1, d], threshold: f32[1], wg_packed: f32[ceil(f/2L), d, 2L],
    wu_t: f32[f, d], wd: f32[f, d], y: f32[1, d])`` with L = ``lanes``.

    Gate dense; up (a dot product with the contiguous row wu_t[f]) and down (row wd[f])
    only for neurons with |act(gate_f)| > threshold. Weights from ``pack_ffn_gate_sparse``.
    ``shifted``: a ``shift: f32[1]`` parameter follows ``threshold`` and the activation is
    act(gate_f - shift) (ProSparse-style shifted ReLU: relu(g - b) is nonzero only for g > b).
    """
    _check_act(act)
    R = schedule.rows_per_step  # every kernel here is batch 1
    prefetch = schedule.prefetch_steps > 0 if prefetch is None else prefetch
    block = 2 * lanes
    nb = panel_count(f, block)
    P = chunks or 2 * 8
    G = NEURONS_PER_STEP
    vec = lanes
    pad = pad_macro(1, R)
    down = accumulate_macro(1, d, R, lanes, chunks, schedule)
    panel_dot = panel_dot_macro(block, schedule)

    @T.macro
    def gate_sparse(x, threshold, shift, wg, wu_t, wd, y):
        gate = T.alloc_buffer((nb * block,), "float32")
        idx = T.alloc_buffer((f + R,), "int32")
        coef = T.alloc_buffer((1, f + R), "float32")
        count = T.alloc_buffer((1,), "int32")
        xv = T.decl_buffer((d,), "float32", data=x.data)
        for b in T.parallel(nb):
            acc = T.alloc_buffer((block,), "float32")
            panel_dot(xv, wg, b, d, acc)
            for j in T.vectorized(block):
                gate[b * block + j] = acc[j]
        count[0] = 0
        for j in range(f):
            if shifted:
                a = T.bind(_act(act, gate[j] - shift[0]))
            else:
                a = T.bind(_act(act, gate[j]))
            coef[0, count[0]] = a
            idx[count[0]] = j
            count[0] = count[0] + T.Select(T.abs(a) > threshold[0], 1, 0)
        pad(idx, coef, count)
        # Up dot products, NEURONS_PER_STEP neurons at once so that several rows stream
        # concurrently (one row at a time is latency bound); padded entries have coef 0.
        groups = T.bind((count[0] + R - 1) // R * (R // G))
        for c in T.parallel(P):
            for q in range(c * groups // P, (c + 1) * groups // P):
                acc = T.alloc_buffer((G, vec), "float32")
                for i in T.unroll(G):
                    for j in T.vectorized(vec):
                        acc[i, j] = T.float32(0)
                for blk in range(d // vec):
                    if prefetch:  # the next group's rows, into L2 (see schedule.prefetch_l2)
                        for i in T.unroll(G):
                            prefetch_l2(T.address_of(wu_t[idx[T.min((q + 1) * G + i, groups * G - 1)], blk * vec]))
                    for i in T.unroll(G):
                        for j in T.vectorized(vec):
                            acc[i, j] = acc[i, j] + x[0, blk * vec + j] * wu_t[idx[q * G + i], blk * vec + j]
                for i in T.unroll(G):
                    total = T.alloc_buffer((1,), "float32")
                    total[0] = T.float32(0)
                    for j in range(vec):
                        total[0] = total[0] + acc[i, j]
                    for c2 in range(d - d // vec * vec):
                        total[0] = total[0] + x[0, d // vec * vec + c2] * wu_t[idx[q * G + i], d // vec * vec + c2]
                    coef[0, q * G + i] = coef[0, q * G + i] * total[0]
        down(wd, y, idx, coef, count)

    @T.prim_func
    def ffn_gate_sparse_kernel(
        x: T.Buffer((1, d), "float32"),
        threshold: T.Buffer((1,), "float32"),
        shift: T.Buffer((1,), "float32"),
        wg: T.Buffer((nb, d, block), "float32"),
        wu_t: T.Buffer((f, d), "float32"),
        wd: T.Buffer((f, d), "float32"),
        y: T.Buffer((1, d), "float32"),
    ):
        T.func_attr({"tir.noalias": True})
        gate_sparse(x, threshold, shift, wg, wu_t, wd, y)

    return without_params(ffn_gate_sparse_kernel, set() if shifted else {"shift"})


def ffn_indexed(d: int, f: int, act: str = "silu", lanes: int = DEFAULT_LANES, chunks: int | None = None,
                shifted: bool = False, prefetch: bool | None = None, schedule: RowSchedule = X86_ROWS):
    """(c) Signature: ``(x: f32[1, d], idx: i32[f], nnz: i32[1], wgu_t: f32[f, 2, d], wd: f32[f, d], y: f32[1, d])``.

    idx[0:nnz] are the active neurons (any order, no repeats; entries past nnz ignored).
    Weights from ``pack_ffn_indexed``. ``shifted``: a ``shift: f32[1]`` parameter follows
    ``nnz`` and the activation is act(gate_f - shift) (shifted ReLU).
    """
    _check_act(act)
    R = schedule.rows_per_step  # every kernel here is batch 1
    prefetch = schedule.prefetch_steps > 0 if prefetch is None else prefetch
    P = chunks or 2 * 8
    G = NEURONS_PER_STEP
    vec = lanes
    pad = pad_macro(1, R)
    down = accumulate_macro(1, d, R, lanes, chunks, schedule)

    @T.macro
    def indexed(x, idx, nnz, shift, wgu_t, wd, y):
        rows = T.alloc_buffer((f + R,), "int32")
        coef = T.alloc_buffer((1, f + R), "float32")
        count = T.alloc_buffer((1,), "int32")
        count[0] = T.max(0, T.min(nnz[0], f))
        active = T.bind(count[0])
        for a in range(active):
            rows[a] = idx[a]
        pad(rows, coef, count)
        # Gate and up dot products, NEURONS_PER_STEP neurons at once: their 2 x that many
        # rows stream concurrently (one neuron at a time left the short rows latency bound).
        groups = T.bind((active + R - 1) // R * (R // G))
        for c in T.parallel(P):
            for q in range(c * groups // P, (c + 1) * groups // P):
                acc = T.alloc_buffer((G, 2, vec), "float32")
                for i in T.unroll(G):
                    for part in T.unroll(2):
                        for j in T.vectorized(vec):
                            acc[i, part, j] = T.float32(0)
                for blk in range(d // vec):
                    if prefetch:  # the next group's rows, into L2 (see schedule.prefetch_l2)
                        for i in T.unroll(G):
                            ahead = T.bind(rows[T.min((q + 1) * G + i, groups * G - 1)])
                            for part in T.unroll(2):
                                prefetch_l2(T.address_of(wgu_t[ahead, part, blk * vec]))
                    for i in T.unroll(G):
                        for part in T.unroll(2):
                            for j in T.vectorized(vec):
                                acc[i, part, j] = acc[i, part, j] + x[0, blk * vec + j] * wgu_t[
                                    rows[q * G + i], part, blk * vec + j
                                ]
                for i in T.unroll(G):
                    sums = T.alloc_buffer((2,), "float32")
                    for part in T.unroll(2):
                        sums[part] = T.float32(0)
                        for j in range(vec):
                            sums[part] = sums[part] + acc[i, part, j]
                        for c2 in range(d - d // vec * vec):
                            sums[part] = sums[part] + x[0, d // vec * vec + c2] * wgu_t[
                                rows[q * G + i], part, d // vec * vec + c2
                            ]
                    if shifted:
                        a = T.bind(_act(act, sums[0] - shift[0]))
                    else:
                        a = T.bind(_act(act, sums[0]))
                    coef[0, q * G + i] = T.Select(q * G + i < active, a * sums[1], T.float32(0))
        down(wd, y, rows, coef, count)

    @T.prim_func
    def ffn_indexed_kernel(
        x: T.Buffer((1, d), "float32"),
        idx: T.Buffer((f,), "int32"),
        nnz: T.Buffer((1,), "int32"),
        shift: T.Buffer((1,), "float32"),
        wgu_t: T.Buffer((f, 2, d), "float32"),
        wd: T.Buffer((f, d), "float32"),
        y: T.Buffer((1, d), "float32"),
    ):
        T.func_attr({"tir.noalias": True})
        indexed(x, idx, nnz, shift, wgu_t, wd, y)

    return without_params(ffn_indexed_kernel, set() if shifted else {"shift"})


PREDICT_MODES = ("threshold", "topk", "statistical")


def pack_predictor(a: np.ndarray, b: np.ndarray, lanes: int = DEFAULT_LANES):
    """-> (A [D, r] and B [r, F] each packed by ``pack_dense`` with block 2 x lanes)."""
    return pack_dense(np.asarray(a, np.float32), 2 * lanes), pack_dense(np.asarray(b, np.float32), 2 * lanes)


def predict_active(d: int, r: int, f: int, mode: str = "threshold", lanes: int = DEFAULT_LANES,
                   schedule: RowSchedule = X86_ROWS):
    """The predictor pass's PredictActive* ops at batch 1, compacted for ``ffn_indexed``.

    Signature: ``(x: f32[1, d], a: f32[ceil(r/B), d, B], b: f32[ceil(f/B), r, B], bias: f32[f],
    param: f32[1] (i32[1] for topk), idx: i32[f], nnz: i32[1])`` with B = 2 x ``lanes`` and
    a, b from ``pack_predictor``. logits = (x @ A) @ B + bias (dense, panel-parallel like
    ``dense_matmul``); the kept neurons, in increasing order, go to idx[0:nnz]:
    - threshold: logits > param;
    - topk: logits >= the param-th largest logit (ties keep more, as the ONNX function does),
      found by a 32-step bitwise search over order-preserving integer keys (no sort);
    - statistical: logits > mean + param x std (population std over the f logits).
    """
    if mode not in PREDICT_MODES:
        raise ValueError(f"mode must be one of {PREDICT_MODES}, got {mode!r}")
    block = 2 * lanes
    nr, nf = panel_count(r, block), panel_count(f, block)
    padded = nf * block
    param_dtype = "int32" if mode == "topk" else "float32"

    panel_dot = panel_dot_macro(block, schedule)

    @T.macro
    def panel_gemv(v, w, out, panels, k):
        for p in T.parallel(panels):
            acc = T.alloc_buffer((block,), "float32")
            panel_dot(v, w, p, k, acc)
            for j in T.vectorized(block):
                out[p * block + j] = acc[j]

    @T.macro
    def kth_largest(logits, k, cut):
        # Order-preserving uint32 keys (negatives flipped, positives offset), padding key 0 (never
        # counted: every candidate has a bit set); the k-th largest key is built bit by bit.
        keys = T.alloc_buffer((padded,), "uint32")
        found = T.alloc_buffer((1,), "uint32")
        for j in range(padded):
            bits = T.bind(T.reinterpret("uint32", logits[T.min(j, f - 1)]))
            key = T.bind(T.Select(bits >= T.uint32(0x80000000), bits ^ T.uint32(0xFFFFFFFF),
                                  bits | T.uint32(0x80000000)))
            keys[j] = T.Select(j < f, key, T.uint32(0))
        found[0] = T.uint32(0)
        for step in range(32):
            candidate = T.bind(found[0] | T.shift_left(T.uint32(1), T.Cast("uint32", 31 - step)))
            counts = T.alloc_buffer((block,), "int32")
            for j in T.vectorized(block):
                counts[j] = 0
            for p in range(nf):
                for j in T.vectorized(block):
                    counts[j] = counts[j] + T.Select(keys[p * block + j] >= candidate, 1, 0)
            total = T.alloc_buffer((1,), "int32")
            total[0] = 0
            for j in range(block):
                total[0] = total[0] + counts[j]
            if total[0] >= k:
                found[0] = candidate
        key = T.bind(found[0])
        bits = T.bind(T.Select(key >= T.uint32(0x80000000), key ^ T.uint32(0x80000000), key ^ T.uint32(0xFFFFFFFF)))
        cut[0] = T.reinterpret("float32", bits)

    @T.prim_func
    def predict_active_kernel(
        x: T.Buffer((1, d), "float32"),
        a: T.Buffer((nr, d, block), "float32"),
        b: T.Buffer((nf, r, block), "float32"),
        bias: T.Buffer((f,), "float32"),
        param: T.Buffer((1,), param_dtype),
        idx: T.Buffer((f,), "int32"),
        nnz: T.Buffer((1,), "int32"),
    ):
        T.func_attr({"tir.noalias": True})
        xv = T.decl_buffer((d,), "float32", data=x.data)
        low = T.alloc_buffer((nr * block,), "float32")
        logits = T.alloc_buffer((padded,), "float32")
        cut = T.alloc_buffer((1,), "float32")
        count = T.alloc_buffer((1,), "int32")
        panel_gemv(xv, a, low, nr, d)
        panel_gemv(low, b, logits, nf, r)
        for j in range(f):
            logits[j] = logits[j] + bias[j]
        if mode == "threshold":
            cut[0] = param[0]
        elif mode == "topk":
            kth_largest(logits, T.max(1, T.min(param[0], f)), cut)
        else:
            total = T.alloc_buffer((2,), "float32")
            total[0] = T.float32(0)
            for j in range(f):
                total[0] = total[0] + logits[j]
            mean = T.bind(total[0] / T.float32(f))
            total[1] = T.float32(0)
            for j in range(f):
                total[1] = total[1] + (logits[j] - mean) * (logits[j] - mean)
            cut[0] = mean + T.sqrt(total[1] / T.float32(f)) * param[0]
        count[0] = 0
        for j in range(f):
            idx[count[0]] = j
            if mode == "topk":
                count[0] = count[0] + T.Select(logits[j] >= cut[0], 1, 0)
            else:
                count[0] = count[0] + T.Select(logits[j] > cut[0], 1, 0)
        nnz[0] = count[0]

    return predict_active_kernel
