"""Dense fp32 matmul y = x @ W for CUDA GPUs (GEMV at batch 1, small batches).

Same signature and weight layout as the CPU kernel (``kernels/cpu/dense.py``): W packed
by ``pack_dense`` into column panels ``Wp[NB, K, block]``, each panel one contiguous
[K, block] slab. One thread block per (panel, row tile). Lane ``l`` of a warp reads
the float4 at row ``l // (block / 4)`` of the warp's current rows, columns
``(l % (block / 4)) * 4 ..``, so a warp reads 512 contiguous bytes per step
(coalesced, vectorized); warps take interleaved groups of rows over K. The partial
sums are combined with warp shuffles (``__shfl_xor_sync``), then across warps in
shared memory (``common.block_store_macro``).
"""

from __future__ import annotations

from tvm.script import tirx as T

from actsparse.codegen.kernels.cuda.common import (
    DEFAULT_WARPS,
    WARP,
    block_store_macro,
    ceil_div,
    check_layout,
    row_tile,
)

UNROLL = 4  # row steps in flight per lane (independent float4 loads)


def panel_macro(m: int, k: int, n: int, block: int, warps: int):
    """T.macro(x, wp, out, b, t, wi, lane): out[row tile t, panel b] = x @ panel b of wp,
    for ``x: f32[m, k]``, ``wp: f32[nb, k, block]``, ``out: f32[m, >= n]``."""
    vec = 4 if block % 4 == 0 else 1
    tpr = block // vec
    check_layout(tpr, vec, warps)
    rows = row_tile(m)
    rows_per_step = WARP // tpr * warps
    steps = ceil_div(ceil_div(k, rows_per_step), UNROLL)
    block_store = block_store_macro(rows, vec, tpr, warps, m, n)

    @T.macro
    def panel(x, wp, out, b, t, wi, lane):
        red = T.alloc_buffer((warps, rows, block), "float32", scope="shared")
        acc = T.alloc_buffer((rows, vec), "float32", scope="local")
        wv = T.alloc_buffer((UNROLL, vec), "float32", scope="local")
        for i in T.unroll(rows):
            for v in T.unroll(vec):
                acc[i, v] = T.float32(0)
        for s in range(steps):
            for u in T.unroll(UNROLL):
                kk = T.bind((s * UNROLL + u) * rows_per_step + wi * (WARP // tpr) + lane // tpr)
                if kk < k:
                    for v in T.vectorized(vec):
                        wv[u, v] = wp[b, kk, (lane % tpr) * vec + v]
                    for i in T.unroll(rows):
                        # Rows past m (last tile) recompute row m-1; block_store drops them.
                        xi = T.bind(x[T.min(t * rows + i, m - 1), kk])
                        for v in T.unroll(vec):
                            acc[i, v] = acc[i, v] + xi * wv[u, v]
        block_store(acc, red, out, t * rows, b * block, wi, lane)

    return panel


def dense_matmul_cuda(m: int, k: int, n: int, block: int = 32, warps: int = DEFAULT_WARPS):
    """y[m, n] = x[m, k] @ W[k, n] with W packed by ``pack_dense(w, block)`` (block 4..128, a power of 2).

    Signature: ``(x: f32[m, k], wp: f32[ceil(n/block), k, block], y: f32[m, n])``.
    """
    nb = ceil_div(n, block)
    row_tiles = ceil_div(m, row_tile(m))
    panel = panel_macro(m, k, n, block, warps)

    @T.prim_func
    def dense_matmul_cuda_kernel(
        x: T.Buffer((m, k), "float32"),
        wp: T.Buffer((nb, k, block), "float32"),
        y: T.Buffer((m, n), "float32"),
    ):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})
        for b in T.thread_binding(nb, thread="blockIdx.x"):
            for t in T.thread_binding(row_tiles, thread="blockIdx.y"):
                for wi in T.thread_binding(warps, thread="threadIdx.y"):
                    for lane in T.thread_binding(WARP, thread="threadIdx.x"):
                        panel(x, wp, y, b, t, wi, lane)

    return dense_matmul_cuda_kernel
