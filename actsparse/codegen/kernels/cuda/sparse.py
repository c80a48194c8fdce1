"""Sparse-input matmul y = x @ W for CUDA GPUs, reading only the rows W[k, :] of active inputs.

Same signatures and weight layout as the CPU kernel (``kernels/cpu/sparse.py``): W is
the plain ONNX [K, N] weight, so every active channel's row is contiguous. One
thread block per (column tile, row tile): it compacts the active channels into
shared memory (``common.gather_macro``: ballot + popc, in channel order), then its
warps split the active list while the lanes of a warp split the tile's columns,
one float4 per lane. Cost is proportional to the active rows, as on the CPU.
"""

from __future__ import annotations

from tvm.script import tirx as T

from actsparse.codegen.kernels.activity import check_mode
from actsparse.codegen.kernels.cuda.common import (
    DEFAULT_WARPS,
    WARP,
    ceil_div,
    gather_macro,
    row_tile,
    threads_per_row,
    vector_width,
)

def sparse_matmul_cuda(m: int, k: int, n: int, mode: str = "threshold", warps: int = DEFAULT_WARPS,
                       tpr: int | None = None):
    """Sparse-input y[m, n] = sum over active k of x[m, k] * W[k, :] on a GPU.

    Signatures (as ``kernels.cpu.sparse_matmul``):
      mode="threshold": ``(x: f32[m, k], threshold: f32[1], w: f32[k, n], y: f32[m, n])``
      mode="scaled":    ``(x: f32[m, k], threshold: f32[1], scale: f32[k], w: f32[k, n], y: f32[m, n])``
      mode="nonzero":   ``(x: f32[m, k], w: f32[k, n], y: f32[m, n])``
    """
    check_mode(mode)
    vec = vector_width(n)
    tpr = tpr or threads_per_row(n, vec)
    rows = row_tile(m)
    tiles, row_tiles = ceil_div(n, tpr * vec), ceil_div(m, rows)
    gather = gather_macro(mode, m, k, n, rows, vec, tpr, warps)

    if mode == "nonzero":

        @T.prim_func
        def sparse_matmul_nonzero_cuda(
            x: T.Buffer((m, k), "float32"),
            w: T.Buffer((k, n), "float32"),
            y: T.Buffer((m, n), "float32"),
        ):
            T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})
            for c in T.thread_binding(tiles, thread="blockIdx.x"):
                for t in T.thread_binding(row_tiles, thread="blockIdx.y"):
                    for wi in T.thread_binding(warps, thread="threadIdx.y"):
                        for lane in T.thread_binding(WARP, thread="threadIdx.x"):
                            gather(x, x, x, w, y, c, t, wi, lane)

        return sparse_matmul_nonzero_cuda

    if mode == "threshold":

        @T.prim_func
        def sparse_matmul_threshold_cuda(
            x: T.Buffer((m, k), "float32"),
            threshold: T.Buffer((1,), "float32"),
            w: T.Buffer((k, n), "float32"),
            y: T.Buffer((m, n), "float32"),
        ):
            T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})
            for c in T.thread_binding(tiles, thread="blockIdx.x"):
                for t in T.thread_binding(row_tiles, thread="blockIdx.y"):
                    for wi in T.thread_binding(warps, thread="threadIdx.y"):
                        for lane in T.thread_binding(WARP, thread="threadIdx.x"):
                            gather(x, threshold, x, w, y, c, t, wi, lane)

        return sparse_matmul_threshold_cuda

    @T.prim_func
    def sparse_matmul_scaled_cuda(
        x: T.Buffer((m, k), "float32"),
        threshold: T.Buffer((1,), "float32"),
        scale: T.Buffer((k,), "float32"),
        w: T.Buffer((k, n), "float32"),
        y: T.Buffer((m, n), "float32"),
    ):
        T.func_attr({"tir.noalias": True, "tirx.is_scheduled": True})
        for c in T.thread_binding(tiles, thread="blockIdx.x"):
            for t in T.thread_binding(row_tiles, thread="blockIdx.y"):
                for wi in T.thread_binding(warps, thread="threadIdx.y"):
                    for lane in T.thread_binding(WARP, thread="threadIdx.x"):
                        gather(x, threshold, scale, w, y, c, t, wi, lane)

    return sparse_matmul_scaled_cuda
