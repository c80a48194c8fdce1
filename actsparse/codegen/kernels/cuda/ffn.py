"""Fused gated FFN at batch 1 on CUDA GPUs: y = (act(x @ Wg) * (x @ Wu)) @ Wd.

Same signatures and packed weights as the CPU kernels (``kernels/cpu/ffn.py``), so the
lowering packs once for either target. Each PrimFunc launches a few kernels in order
on one stream (TVM splits the thread-bound loops into separate launches); the
intermediates (gate, hidden coefficients) live in device workspace memory.

(b) ``ffn_gate_sparse_cuda``: 1. gate = x @ Wg (dense panel GEMV, ``dense.panel_macro``);
    2. one warp per neuron f: if |act(gate_f)| > t, up_f = x . Wu^T[f] (float4 loads,
    shuffle reduction) and coef_f = act(gate_f) * up_f, else coef_f = 0 and the warp
    reads nothing; 3. y = coef @ Wd over the nonzero coef only (``common.gather_macro``).
(a) ``ffn_input_sparse_cuda``: 1. [gate | up] = x @ [Wg | Wu] over the inputs with
    |x| > t_in (gather); 2. h = act(gate) * up, zero where |h| <= t_down; 3. y = h @ Wd
    over the nonzero h (gather).
"""

from __future__ import annotations

from tvm.script import tirx as T

from actsparse.codegen.kernels.cuda.common import (
    DEFAULT_WARPS,
    WARP,
    ceil_div,
    gather_macro,
    shuffle_xor,
    threads_per_row,
    vector_width,
)
from actsparse.codegen.kernels.cuda.dense import panel_macro
from actsparse.codegen.kernels.params import without_params

ACTIVATIONS = ("silu", "relu")


def _check_act(act: str) -> None:
    if act not in ACTIVATIONS:
        raise ValueError(f"act must be one of {ACTIVATIONS}, got {act!r}")


def _act(act: str, g):
    return g * T.sigmoid(g) if act == "silu" else T.max(g, T.float32(0))


def _up_macro(act: str, d: int, f: int, warps: int, shifted: bool):
    """T.macro(x, threshold, shift, gate, wu_t, coef, blk, wi, lane): coef[0, f] for the
    neuron of this warp (see module docstring, step 2)."""
    vec = vector_width(d)
    steps = ceil_div(d, WARP * vec)

    @T.macro
    def up(x, threshold, shift, gate, wu_t, coef, blk, wi, lane):
        acc = T.alloc_buffer((vec,), "float32", scope="local")
        xv = T.alloc_buffer((vec,), "float32", scope="local")
        wv = T.alloc_buffer((vec,), "float32", scope="local")
        dot = T.alloc_buffer((1,), "float32", scope="local")
        neuron = T.bind(blk * warps + wi)
        if neuron < f:  # uniform across the warp, like the branch below
            if shifted:
                a = T.bind(_act(act, gate[0, neuron] - shift[0]))
            else:
                a = T.bind(_act(act, gate[0, neuron]))
            if T.abs(a) > threshold[0]:
                for v in T.unroll(vec):
                    acc[v] = T.float32(0)
                for s in range(steps):
                    col = T.bind((s * WARP + lane) * vec)
                    if col < d:
                        for v in T.vectorized(vec):
                            xv[v] = x[0, col + v]
                        for v in T.vectorized(vec):
                            wv[v] = wu_t[neuron, col + v]
                        for v in T.unroll(vec):
                            acc[v] = acc[v] + xv[v] * wv[v]
                dot[0] = T.float32(0)
                for v in T.unroll(vec):
                    dot[0] = dot[0] + acc[v]
                for j in T.unroll(5):
                    dot[0] = dot[0] + shuffle_xor(dot[0], T.shift_left(1, j))
                if lane == 0:
                    coef[0, neuron] = a * dot[0]
            else:
                if lane == 0:
                    coef[0, neuron] = T.float32(0)

    return up


def ffn_gate_sparse_cuda(d: int, f: int, act: str = "relu", block: int = 32, warps: int = DEFAULT_WARPS,
                         shifted: bool = False):
    """(b) Signature (as ``kernels.cpu.ffn_gate_sparse``): ``(x: f32[1, d], threshold: f32[1],
    [shift: f32[1] if shifted,] wg_packed: f32[ceil(f/block), d, block], wu_t: f32[f, d],
    wd: f32[f, d], y: f32[1, d])``, weights from ``pack_ffn_gate_sparse``."""
    _check_act(act)
    nb = ceil_div(f, block)
    gate_panel = panel_macro(1, d, f, block, warps)
    up = _up_macro(act, d, f, warps, shifted)
    vec = vector_width(d)
    tpr = threads_per_row(d, vec)
    down = gather_macro("nonzero", 1, f, d, 1, vec, tpr, warps)
    tiles = ceil_div(d, tpr * vec)
    neuron_blocks = ceil_div(f, warps)

    @T.macro
    def body(x, threshold, shift, wg, wu_t, wd, y):
        gate = T.alloc_buffer((1, f), "float32")
        coef = T.alloc_buffer((1, f), "float32")
        for b in T.thread_binding(nb, thread="blockIdx.x"):
            for wi in T.thread_binding(warps, thread="threadIdx.y"):
                for lane in T.thread_binding(WARP, thread="threadIdx.x"):
                    gate_panel(x, wg, gate, b, 0, wi, lane)
        for blk in T.thread_binding(neuron_blocks, thread="blockIdx.x"):
            for wi in T.thread_binding(warps, thread="threadIdx.y"):
                for lane in T.thread_binding(WARP, thread="threadIdx.x"):
                    up(x, threshold, shift, gate, wu_t, coef, blk, wi, lane)
        for c in T.thread_binding(tiles, thread="blockIdx.x"):
            for wi in T.thread_binding(warps, thread="threadIdx.y"):
                for lane in T.thread_binding(WARP, thread="threadIdx.x"):
                    down(coef, coef, coef, wd, y, c, 0, wi, lane)

    @T.prim_func
    def ffn_gate_sparse_cuda_kernel(
        x: T.Buffer((1, d), "float32"),
        threshold: T.Buffer((1,), "float32"),
        shift: T.Buffer((1,), "float32"),
        wg: T.Buffer((nb, d, block), "float32"),
        wu_t: T.Buffer((f, d), "float32"),
        wd: T.Buffer((f, d), "float32"),
        y: T.Buffer((1, d), "float32"),
    ):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})
        body(x, threshold, shift, wg, wu_t, wd, y)

    return without_params(ffn_gate_sparse_cuda_kernel, set() if shifted else {"shift"})


def ffn_input_sparse_cuda(d: int, f: int, act: str = "silu", warps: int = DEFAULT_WARPS):
    """(a) Signature (as ``kernels.cpu.ffn_input_sparse``): ``(x: f32[1, d], t_in: f32[1],
    t_down: f32[1], wgu: f32[d, 2f], wd: f32[f, d], y: f32[1, d])``, weights from
    ``pack_ffn_input_sparse``."""
    _check_act(act)
    vec_up, vec_down = vector_width(2 * f), vector_width(d)
    tpr_up, tpr_down = threads_per_row(2 * f, vec_up), threads_per_row(d, vec_down)
    gate_up = gather_macro("threshold", 1, d, 2 * f, 1, vec_up, tpr_up, warps)
    down = gather_macro("nonzero", 1, f, d, 1, vec_down, tpr_down, warps)
    up_tiles, down_tiles = ceil_div(2 * f, tpr_up * vec_up), ceil_div(d, tpr_down * vec_down)
    threads = warps * WARP
    hidden_blocks = ceil_div(f, threads)

    @T.prim_func
    def ffn_input_sparse_cuda_kernel(
        x: T.Buffer((1, d), "float32"),
        t_in: T.Buffer((1,), "float32"),
        t_down: T.Buffer((1,), "float32"),
        wgu: T.Buffer((d, 2 * f), "float32"),
        wd: T.Buffer((f, d), "float32"),
        y: T.Buffer((1, d), "float32"),
    ):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})
        gu = T.alloc_buffer((1, 2 * f), "float32")
        h = T.alloc_buffer((1, f), "float32")
        for c in T.thread_binding(up_tiles, thread="blockIdx.x"):
            for wi in T.thread_binding(warps, thread="threadIdx.y"):
                for lane in T.thread_binding(WARP, thread="threadIdx.x"):
                    gate_up(x, t_in, x, wgu, gu, c, 0, wi, lane)
        for blk in T.thread_binding(hidden_blocks, thread="blockIdx.x"):
            for tid in T.thread_binding(threads, thread="threadIdx.x"):
                j = T.bind(blk * threads + tid)
                if j < f:
                    hj = T.bind(_act(act, gu[0, j]) * gu[0, f + j])
                    h[0, j] = T.Select(T.abs(hj) > t_down[0], hj, T.float32(0))
        for c in T.thread_binding(down_tiles, thread="blockIdx.x"):
            for wi in T.thread_binding(warps, thread="threadIdx.y"):
                for lane in T.thread_binding(WARP, thread="threadIdx.x"):
                    down(h, h, h, wd, y, c, 0, wi, lane)

    return ffn_input_sparse_cuda_kernel
