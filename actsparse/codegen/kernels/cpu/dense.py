"""Dense fp32 matmul y = x @ W for CPUs (GEMV at M=1, small batches, encoder-size M).

Layout: W [K, N] (ONNX MatMul) is packed once at compile time into column panels
``Wp[NB, K, block]`` (``pack_dense``): panel b holds columns b*block .. b*block+block-1
of every row, contiguously, zero-padded past N. A thread then reads one contiguous
stream per panel, which is what reached full memory bandwidth in our measurements,
and keeps a ``rows x block`` tile of y in registers for the whole K loop.
"""

from __future__ import annotations

import numpy as np
from tvm.script import tirx as T

from actsparse.codegen.kernels.cpu.schedule import X86_ROWS, RowSchedule, stream_prefetch_macro
from actsparse.codegen.targets import DEFAULT_LANES, describe_target


def vector_lanes(target) -> int:
    """fp32 lanes of the widest vector register a ``tvm.target.Target`` has (16, 8 or 4; TargetInfo)."""
    return describe_target(target).vector_lanes


def panel_count(n: int, block: int) -> int:
    return (n + block - 1) // block


def pack_dense(w: np.ndarray, block: int = 2 * DEFAULT_LANES) -> np.ndarray:
    """W [K, N] -> Wp [ceil(N/block), K, block], columns past N zero."""
    k, n = w.shape
    nb = panel_count(n, block)
    padded = np.zeros((k, nb * block), dtype=np.float32)
    padded[:, :n] = w
    return np.ascontiguousarray(padded.reshape(k, nb, block).transpose(1, 0, 2))


# TVM turns a buffer of 1024 bytes or more (kMaxStackAlloca) into a heap workspace; LLVM cannot
# keep that in registers and stores every accumulator on every k step. An 8 x 32 fp32 tile is
# exactly 1024 bytes: it ran at 87 GFLOP/s where 6 x 32 reached 222 (M=128, K=384, N=1536).
STACK_ALLOCA_LIMIT = 1024


def default_row_tile(m: int, lanes: int = DEFAULT_LANES) -> int:
    """Rows of y held in registers at once: two vectors per row, within the register file and
    below TVM's stack-allocation limit."""
    accumulator_vectors = 12
    rows = accumulator_vectors // 2
    while rows > 1 and rows * 2 * lanes * 4 >= STACK_ALLOCA_LIMIT:
        rows -= 1
    return max(1, min(m, rows))


# How the weight operand of `dense_matmul` is laid out (all read as the same panels, by strides).
PACKED, ROWS, COLUMNS = "packed", "kn", "nk"
ROWS_AHEAD = 8  # rows of a row-major W prefetched ahead of the panel's current one


def dense_matmul(m: int, k: int, n: int, lanes: int = DEFAULT_LANES, row_tile: int | None = None,
                 layout: str = PACKED, row_stride: int | None = None, offset: int = 0,
                 schedule: RowSchedule = X86_ROWS, weight_rows: int | None = None):
    """y[m, n] = x[m, k] @ W[k, n] with W packed by ``pack_dense(w, block=2*lanes)``.

    Signature: ``(x: f32[m, k], wp: f32[ceil(n/block), k, block], y: f32[m, n])``. The prompt's
    multi-row kernels also read the weights other kernels were given, through strides:
    ``layout=ROWS``: wp is W itself, f32[k, n] (the sparse kernels' row-major layout), or the first
    k of its ``weight_rows`` rows (R-Sparse's [W; B]);
    ``layout=COLUMNS``: wp is W^T, f32[n, k] (rows `row_stride` apart, from element `offset`:
    the gate rows of an interleaved [F, 2, D] buffer, then passed flat, f32[n * row_stride]).
    Both need n to be a multiple of the block.
    Parallel over (column panel, row tile); row tiles of a panel run on the same
    thread one after another, so the panel is read from DRAM once. At M = 1 the panel stream is
    prefetched ahead as the target's schedule says (``schedule.stream_prefetch_macro``).
    """
    block = 2 * lanes
    rows = row_tile or default_row_tile(m, lanes)
    nb = panel_count(n, block)
    if layout != PACKED and n % block:
        raise ValueError(f"an unpacked W needs n ({n}) to be a multiple of the {block}-column block")
    stride = row_stride or k
    if offset + k > stride:
        raise ValueError(f"rows of {k} from element {offset} do not fit a row stride of {stride}")
    w_shape, panel_strides = {
        PACKED: ((nb, k, block), (k * block, block, 1)),
        ROWS: ((weight_rows or k, n), (block, n, 1)),
        COLUMNS: (((n, k) if row_stride is None else (n * stride,)), (block * stride, 1, stride)),
    }[layout]
    mt = (m + rows - 1) // rows
    last_row = m - 1
    # The prefetch only at M = 1 (K=1024, N=2816 out of cache: 10 % faster). At M = 2, 4, 8 the same
    # kernel was 11, 17 and 25 % slower with it, and all-MiniLM-L6-v2 (128 rows) 4 % slower.
    # A row-major W is another matter: each step of a panel is on another page, where the
    # hardware prefetchers stop, so the panel's rows ROWS_AHEAD steps on are prefetched.
    ahead = {PACKED: schedule.stream_prefetch_bytes if m == 1 else 0, ROWS: ROWS_AHEAD * n * 4, COLUMNS: 0}[layout]
    prefetch_stream = stream_prefetch_macro(element_bytes=4, ahead_bytes=ahead)
    step_b, step_k = panel_strides[0], panel_strides[1]  # flat offset of (panel b, row kk)

    @T.prim_func
    def dense_matmul_kernel(
        x: T.Buffer((m, k), "float32"),
        w: T.Buffer(w_shape, "float32"),
        y: T.Buffer((m, n), "float32"),
    ):
        T.func_attr({"tir.noalias": True})
        wp = T.decl_buffer((nb, k, block), "float32", data=w.data, strides=panel_strides, elem_offset=offset)
        flat = T.decl_buffer((nb * k * block,), "float32", data=w.data)
        for task in T.parallel(nb * mt):
            b = T.bind(task // mt)
            m0 = T.bind((task % mt) * rows)
            acc = T.alloc_buffer((rows, block), "float32")
            for i in T.unroll(rows):
                for j in T.vectorized(block):
                    acc[i, j] = T.float32(0)
            for kk in range(k):
                prefetch_stream(flat, b * step_b + kk * step_k)
                for i in T.unroll(rows):
                    # Rows past m (last tile) recompute row m-1; their results are not stored.
                    xv = T.bind(x[T.min(m0 + i, last_row), kk])
                    for j in T.vectorized(block):
                        acc[i, j] = acc[i, j] + xv * wp[b, kk, j]
            for i in range(rows):
                if m0 + i < m:
                    if b * block + block <= n:
                        for j in T.vectorized(block):
                            y[m0 + i, b * block + j] = acc[i, j]
                    else:
                        for j in range(block):
                            if b * block + j < n:
                                y[m0 + i, b * block + j] = acc[i, j]

    return dense_matmul_kernel
