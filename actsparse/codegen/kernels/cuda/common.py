"""Building blocks of the CUDA kernels: thread layout, warp shuffles, ballot compaction.

Layout shared by every kernel: a thread block is ``warps`` warps of 32 lanes
(threadIdx.y = warp, threadIdx.x = lane). A weight row segment of ``tile`` floats is
read by ``tpr = tile / vec`` consecutive lanes with one ``vec``-wide (float4) load
each, so one warp reads ``32 / tpr`` rows at once, every row segment contiguous
(coalesced: 128-512 bytes per row). Each lane accumulates ``rows x vec`` outputs in
registers; at the end the lanes that hold the same columns are summed with
``__shfl_xor_sync`` (offsets tpr .. 16), then the warps through shared memory.

The active-channel compaction (sparse kernels) is deterministic: every block tests a
chunk of ``warps * 32 * rounds`` channels, one per lane per round, takes
``__ballot_sync`` of the results and places the active channels in channel order with
``__popc`` prefix counts. Sums therefore run in the same order on every call.
"""

from __future__ import annotations

from tvm.script import tirx as T

from actsparse.codegen.kernels.activity import active_expr

WARP = 32
FULL_MASK = 0xFFFFFFFF
DEFAULT_WARPS = 8
MAX_ROWS = 8  # output rows (batch) one block keeps in registers
COMPACT_ROUNDS = 4  # channels tested per lane per compaction chunk


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def vector_width(n: int) -> int:
    """float4 loads when rows of n floats stay 16-byte aligned, else scalar loads."""
    return 4 if n % 4 == 0 else 1


def row_tile(m: int) -> int:
    return min(m, MAX_ROWS)


def threads_per_row(columns: int, vec: int, sms: int = 132) -> int:
    """Lanes sharing one weight row (8, 16 or 32): the widest segment that still gives
    about two column tiles per SM (132 SMs on an H100 SXM). Not tuned on a GPU yet."""
    for tpr in (32, 16):
        if ceil_div(columns, tpr * vec) >= 2 * sms:
            return tpr
    return 8


def check_layout(tpr: int, vec: int, warps: int) -> None:
    if tpr not in (1, 2, 4, 8, 16, 32) or vec not in (1, 2, 4) or not 1 <= warps <= 32:
        raise ValueError(f"unsupported thread layout: tpr={tpr} vec={vec} warps={warps}")


def shuffle_xor(value, offset):
    return T.tvm_warp_shuffle_xor(T.uint32(FULL_MASK), value, offset, WARP, WARP)


def warp_reduce_macro(rows: int, vec: int, tpr: int):
    """T.macro(acc): sum acc[rows, vec] over the lanes that hold the same columns
    (lane, lane ^ tpr, lane ^ 2 tpr, ...). Afterwards lanes 0..tpr-1 hold the sums."""
    steps = (WARP // tpr).bit_length() - 1

    @T.macro
    def warp_reduce(acc):
        for j in T.unroll(steps):
            for i in T.unroll(rows):
                for v in T.unroll(vec):
                    acc[i, v] = acc[i, v] + shuffle_xor(acc[i, v], T.shift_left(tpr, j))

    return warp_reduce


def block_store_macro(rows: int, vec: int, tpr: int, warps: int, m: int, n: int):
    """T.macro(acc, red, out, row0, col0, wi, lane): warp-reduce acc, sum the warps
    through the shared ``red[warps, rows, tpr * vec]`` and store the tile at
    out[row0 + i, col0 + j] (rows >= m and columns >= n are dropped)."""
    tile = tpr * vec
    outputs = rows * tile
    passes = ceil_div(outputs, warps * WARP)
    warp_reduce = warp_reduce_macro(rows, vec, tpr)

    @T.macro
    def block_store(acc, red, out, row0, col0, wi, lane):
        warp_reduce(acc)
        if lane < tpr:
            for i in T.unroll(rows):
                for v in T.vectorized(vec):
                    red[wi, i, lane * vec + v] = acc[i, v]
        T.tvm_storage_sync("shared")
        for p in range(passes):
            e = T.bind(p * warps * WARP + wi * WARP + lane)
            if e < outputs:
                total = T.alloc_buffer((1,), "float32", scope="local")
                total[0] = T.float32(0)
                for q in range(warps):
                    total[0] = total[0] + red[q, e // tile, e % tile]
                if row0 + e // tile < m and col0 + e % tile < n:
                    out[row0 + e // tile, col0 + e % tile] = total[0]

    return block_store


def gather_macro(mode: str, m: int, k: int, n: int, rows: int, vec: int, tpr: int, warps: int,
                 rounds: int = COMPACT_ROUNDS):
    """T.macro(x, threshold, scale, w, out, tile_index, row_tile_index, wi, lane):

    out[rows of this row tile, columns of this column tile] = sum over the active
    channels c of x[:, c] * w[c, columns], reading only the rows w[c] of active c
    (a channel is read when it is active in any row of the tile). w is [k, n].
    Channels are compacted chunk by chunk (``warps * 32 * rounds`` at a time) into shared
    memory, so any k fits; then each warp takes every ``warps``-th group of
    ``32 / tpr`` active rows.
    """
    check_layout(tpr, vec, warps)
    tile = tpr * vec
    chunk = warps * WARP * rounds
    chunks = ceil_div(k, chunk)
    rows_per_warp = WARP // tpr
    slots = rounds * warps
    block_store = block_store_macro(rows, vec, tpr, warps, m, n)

    @T.macro
    def gather(x, threshold, scale, w, out, c, t, wi, lane):
        ids = T.alloc_buffer((chunk,), "int32", scope="shared")
        counts = T.alloc_buffer((slots,), "int32", scope="shared")
        red = T.alloc_buffer((warps, rows, tile), "float32", scope="shared")
        acc = T.alloc_buffer((rows, vec), "float32", scope="local")
        wv = T.alloc_buffer((vec,), "float32", scope="local")
        ballots = T.alloc_buffer((rounds,), "uint32", scope="local")
        total = T.alloc_buffer((1,), "int32", scope="local")
        before = T.alloc_buffer((1,), "int32", scope="local")
        hit = T.alloc_buffer((1,), "int32", scope="local")
        for i in T.unroll(rows):
            for v in T.unroll(vec):
                acc[i, v] = T.float32(0)
        for ch in range(chunks):
            # 1. which channels of this chunk count: one ballot per warp and round
            for r in T.unroll(rounds):
                kk = T.bind(ch * chunk + r * warps * WARP + wi * WARP + lane)
                hit[0] = 0
                for i in T.unroll(rows):
                    if kk < k and t * rows + i < m:
                        if active_expr(mode, x[t * rows + i, kk], threshold, scale, kk):
                            hit[0] = 1
                ballots[r] = T.call_extern("uint32", "__ballot_sync", T.uint32(FULL_MASK), hit[0])
                if lane == 0:
                    counts[r * warps + wi] = T.call_pure_extern("int32", "__popc", ballots[r])
            T.tvm_storage_sync("shared")
            # 2. place them in channel order: slots before mine, then lanes below mine
            total[0] = 0
            for q in range(slots):
                total[0] = total[0] + counts[q]
            for r in T.unroll(rounds):
                before[0] = 0
                for q in range(r * warps + wi):
                    before[0] = before[0] + counts[q]
                below = T.bind(ballots[r] & (T.shift_left(T.uint32(1), T.Cast("uint32", lane)) - T.uint32(1)))
                if T.bitwise_and(T.shift_right(ballots[r], T.Cast("uint32", lane)), T.uint32(1)) == T.uint32(1):
                    ids[before[0] + T.call_pure_extern("int32", "__popc", below)] = (
                        ch * chunk + r * warps * WARP + wi * WARP + lane
                    )
            T.tvm_storage_sync("shared")
            # 3. accumulate the active rows: lanes lane // tpr of a warp share one row
            for s in range(T.floordiv(total[0] + warps * rows_per_warp - 1, warps * rows_per_warp)):
                j = T.bind(s * warps * rows_per_warp + wi * rows_per_warp + lane // tpr)
                col = T.bind(c * tile + (lane % tpr) * vec)
                if j < total[0] and col < n:
                    row = T.bind(ids[j])
                    for v in T.vectorized(vec):
                        wv[v] = w[row, col + v]
                    for i in T.unroll(rows):
                        xi = T.bind(x[T.min(t * rows + i, m - 1), row])
                        coef = T.bind(T.Select(active_expr(mode, xi, threshold, scale, row), xi, T.float32(0)))
                        for v in T.unroll(vec):
                            acc[i, v] = acc[i, v] + coef * wv[v]
            T.tvm_storage_sync("shared")  # ids and counts are rewritten by the next chunk
        block_store(acc, red, out, t * rows, c * tile, wi, lane)

    return gather
