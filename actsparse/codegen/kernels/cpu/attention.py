"""One decode step of causal attention over a preallocated KV cache, for CPUs.

    q   [kv_heads, group, head_dim]   already scaled (1/sqrt(head_dim) folded in before)
    k,v [kv_heads, 1, head_dim]       this token's key and value
    ck  [kv_heads, head_dim, capacity]  keys, stored transposed: the score loop runs over
                                        positions, contiguous, so it vectorizes
    cv  [kv_heads, capacity, head_dim]  values, one contiguous row per position
    pos [1] int64                     this token's position p (the cache holds 0 .. p-1)
    out [kv_heads, group, head_dim]   softmax(q · ck[:, :, 0..p]) · cv[:, 0..p, :]

The kernel first writes k and v into the cache at p (the cache is runtime state owned by the
caller, not a value of the graph). The work is proportional to the current length p + 1, not to
the capacity. A task takes one kv head and the `group` query heads that share it, so each key
and value is read once per step, not once per query head; decode splits the positions 0..p (from
p + 1 - window with a sliding window) into a few ranges, one task each (flash-decoding: each
range's softmax max, sum and weighted values, combined at the end), so that few kv heads still
make balanced parallel tasks. Scores are computed whole vectors at a time up to the next multiple
of `lanes`: capacity must be a multiple of `lanes` (the entries past p are finite leftovers or
zeros, or inf in a float16 cache, and are masked out of the softmax; values are read only at
attended positions).

`prefill_attention` is the same computation for a chunk of R prompt tokens at positions
p .. p + R - 1: it writes the chunk's keys and values first, then row i attends to 0 .. p + i
(causal within the chunk). A task takes one kv head and a few rows, all their query heads
together. Rows past the capacity (padding of a short last chunk) are neither written nor
meaningful.

Measured on the 2-core AVX-512 machine (benchmarks/bench_attention.py, SmolLM-360M shape: 5 kv
heads, group 3, head_dim 64, capacity 2048, caches rotating far beyond the L3, interleaved with
the kernels of before): see benchmarks/README.md.
"""

from __future__ import annotations

from tvm.script import tirx as T

from actsparse.codegen.kernels.cpu.fastmath import exp_f32
from actsparse.codegen.kernels.cpu.schedule import prefetch_l2

NEG_INF = -3.0e38
# Decode: kv heads x ranges >= 8 tasks (5 kv heads: 2 ranges each). At 512, 1,024 and 2,000
# positions, float32, 2 threads, 3 ranges ran 0.96-0.99x as fast as 2, 4 ranges 0.90-0.98x.
DECODE_TASKS = 8
MIN_RANGE_BLOCKS = 8  # no range shorter than 8 vectors of positions (short contexts: fewer tasks)
SCORE_BYTES = 16384  # a decode range's score rows stay in L1 (longer contexts: more ranges)
# Keys are read KEY_ROWS rows of ck at a time, each row's positions in order, the rows' positions
# PREFETCH_POSITIONS ahead in that order prefetched into L2. 1,024 positions, 2 threads, float16 /
# float32: 8 rows a pass 1.25x / 1.18x as fast as 2 rows a pass, 1.03-1.04x as fast as 4, 16 rows
# 0.90x / 1.00x of 8. Prefetch, float16, one thread: 512 positions ahead 1.12x as fast as none,
# 1.15x as fast as 1,024 ahead, 256 ahead 0.95-0.97x of 512; float32: none, 256 and 512 alike.
# (Reading ck alone out of cache, one thread: row by row unprefetched 0.57x a contiguous read of
# the same bytes, 128-position tiles of all 64 rows 0.73x, row by row 4 KB ahead 0.92x.)
KEY_ROWS = 8
PREFETCH_POSITIONS = 512
ACCUMULATORS = 16  # vector accumulators a loop keeps in registers (of 32 on AVX-512)


def cache_capacity(max_context: int, lanes: int = 16) -> int:
    """Positions the cache holds: max_context rounded up to whole vectors."""
    return -(-max_context // lanes) * lanes


CACHE_DTYPES = ("float32", "float16")


def _check_cache(capacity: int, lanes: int, dtype: str) -> None:
    if capacity % lanes:
        raise ValueError(f"capacity {capacity} is not a multiple of {lanes} lanes")
    if dtype not in CACHE_DTYPES:
        raise ValueError(f"KV cache dtype {dtype!r}: expected one of {', '.join(CACHE_DTYPES)}")


def _largest_divisor(n: int, at_most: int) -> int:
    """The largest divisor of n that is at most `at_most` (at least 1)."""
    return max(d for d in range(1, max(1, min(n, at_most)) + 1) if n % d == 0)


def _value_group(G: int, D: int, L: int) -> int:
    """Query heads whose weighted values one pass over the values accumulates: G x D/L vector
    accumulators at most ACCUMULATORS (group 3, head_dim 64: all 3, 12 vectors)."""
    return _largest_divisor(G, ACCUMULATORS // -(-D // L))


def decode_attention(kv_heads: int, group: int, head_dim: int, capacity: int, *, window: int = 0,
                     lanes: int = 16, cache_dtype: str = "float32"):
    """The PrimFunc (see the module docstring). `window` > 0 attends to the last `window` positions.
    `cache_dtype` float16 halves the cache's bytes: keys and values are rounded as they are
    written and widened to float32 as they are read (all arithmetic stays float32)."""
    _check_cache(capacity, lanes, cache_dtype)
    KV, G, D, C, L, W = kv_heads, group, head_dim, capacity, lanes, window
    ranges = -(-DECODE_TASKS // KV)
    max_blocks = max(MIN_RANGE_BLOCKS, SCORE_BYTES // (4 * G * L))
    S = max(ranges, -(-(C // L) // max_blocks))  # partial results a kv head may have
    key_scores, softmax, weighted_values = _attend_macros(1, G, D, C, L, W, cache_dtype)
    GB = _value_group(G, D, L)

    @T.macro
    def combine(peaks, totals, partial, out, h, g, splits):
        # out[h, g] from the ranges' results: each range's weighted values and sum scaled by
        # exp(its max - the largest max)
        best = T.alloc_buffer((1,), "float32")
        total = T.alloc_buffer((1,), "float32")
        best[0] = T.float32(NEG_INF)
        total[0] = T.float32(0)
        for s in range(splits):
            best[0] = T.max(best[0], peaks[h, s, g])
        for d in T.vectorized(D):
            out[h, g, d] = T.float32(0)
        for s in range(splits):
            w = T.bind(exp_f32(peaks[h, s, g] - best[0]))
            total[0] = total[0] + w * totals[h, s, g]
            for d in T.vectorized(D):
                out[h, g, d] = out[h, g, d] + w * partial[h, s, g, d]
        for d in T.vectorized(D):
            out[h, g, d] = out[h, g, d] / total[0]

    @T.prim_func
    def attention(q: T.Buffer((KV, G, D), "float32"), k: T.Buffer((KV, 1, D), "float32"),
                  v: T.Buffer((KV, 1, D), "float32"), ck: T.Buffer((KV, D, C), cache_dtype),
                  cv: T.Buffer((KV, C, D), cache_dtype), pos: T.Buffer((1,), "int64"),
                  out: T.Buffer((KV, G, D), "float32")):
        T.func_attr({"tir.noalias": True})
        qv = T.decl_buffer((1, KV, G, D), "float32", data=q.data)
        scores = T.alloc_buffer((KV, G, C), "float32")
        peaks = T.alloc_buffer((KV, S, G), "float32")
        totals = T.alloc_buffer((KV, S, G), "float32")
        partial = T.alloc_buffer((KV, S, G, D), "float32")
        p = T.bind(T.Cast("int32", T.max(T.min(pos[0], T.int64(C - 1)), T.int64(0))))
        start = T.bind(T.max(p + 1 - W, 0) if W > 0 else 0)
        first = T.bind(start // L)
        n = T.bind((p + L) // L - first)  # whole vectors covering start .. p
        splits = T.bind(T.max(T.min(ranges, (n + MIN_RANGE_BLOCKS - 1) // MIN_RANGE_BLOCKS),
                              (n + max_blocks - 1) // max_blocks))
        # vectors a range; none is empty: (splits - 1) x per < n, as splits <= 8 or per <= max_blocks
        per = T.bind((n + splits - 1) // splits)
        for task in T.parallel(KV * splits):
            h = T.bind(task // splits)
            s = T.bind(task % splits)
            b0 = T.bind(first + s * per)
            nb = T.bind(T.min(per, first + n - b0))
            if s == splits - 1:  # the range that holds p writes this head's k and v there first
                for d in range(D):
                    ck[h, d, p] = T.Cast(cache_dtype, k[h, 0, d])
                for d in T.vectorized(D):
                    cv[h, p, d] = T.Cast(cache_dtype, v[h, 0, d])
            peak = T.alloc_buffer((G,), "float32")
            total = T.alloc_buffer((G,), "float32")
            key_scores(qv, ck, scores, h, h, 0, b0 * L, nb)
            softmax(scores, h, peak, total, p, 0, b0 * L, nb)
            lo = T.bind(T.max(b0 * L, start))
            for gc in range(G // GB):
                acc = T.alloc_buffer((GB, D), "float32")
                weighted_values(cv, scores, h, h, gc * GB, lo, T.min(b0 * L + nb * L, p + 1), acc)
                for i in T.unroll(GB):
                    for d in T.vectorized(D):
                        partial[h, s, gc * GB + i, d] = acc[i, d]
            for g in range(G):
                peaks[h, s, g] = peak[g]
                totals[h, s, g] = total[g]
        for h in range(KV):
            for g in range(G):
                combine(peaks, totals, partial, out, h, g, splits)

    return attention


def prefill_attention(kv_heads: int, group: int, head_dim: int, capacity: int, rows: int, *, window: int = 0,
                      lanes: int = 16, cache_dtype: str = "float32"):
    """Causal attention of `rows` prompt tokens (see the module docstring):
    ``(q: f32[rows, kv*group, D], k, v: f32[rows, kv, D], ck, cv (the cache), pos: i64[1] (the first
    row's position), out: f32[rows, kv*group, D])``; query head j reads kv head j // group."""
    _check_cache(capacity, lanes, cache_dtype)
    KV, G, D, C, R, L, W = kv_heads, group, head_dim, capacity, rows, lanes, window
    heads = KV * G
    RB = min(R, 1 << (max(1, ACCUMULATORS // G).bit_length() - 1))  # rows a task: RB x G <= 16 queries
    blocks = -(-R // RB)
    key_scores, softmax, weighted_values = _attend_macros(RB, G, D, C, L, W, cache_dtype, R)
    GB = _value_group(G, D, L)

    @T.prim_func
    def attention(q: T.Buffer((R, heads, D), "float32"), k: T.Buffer((R, KV, D), "float32"),
                  v: T.Buffer((R, KV, D), "float32"), ck: T.Buffer((KV, D, C), cache_dtype),
                  cv: T.Buffer((KV, C, D), cache_dtype), pos: T.Buffer((1,), "int64"),
                  out: T.Buffer((R, heads, D), "float32")):
        T.func_attr({"tir.noalias": True})
        qv = T.decl_buffer((R, KV, G, D), "float32", data=q.data)
        scores = T.alloc_buffer((KV * blocks, RB * G, C), "float32")
        first = T.bind(T.Cast("int32", T.max(T.min(pos[0], T.int64(C - 1)), T.int64(0))))
        for h in range(KV):  # each key row's positions one after another
            for d in range(D):
                for i in range(T.min(R, C - first)):
                    ck[h, d, first + i] = T.Cast(cache_dtype, k[i, h, d])
            for i in range(T.min(R, C - first)):
                for d in T.vectorized(D):
                    cv[h, first + i, d] = T.Cast(cache_dtype, v[i, h, d])
        for task in T.parallel(KV * blocks):
            h = T.bind(task // blocks)
            row0 = T.bind(task % blocks * RB)
            p0 = T.bind(T.min(first + row0, C - 1))
            b0 = T.bind((T.max(p0 + 1 - W, 0) if W > 0 else 0) // L)
            nb = T.bind((T.min(first + T.min(row0 + RB, R) - 1, C - 1) + L) // L - b0)
            peak = T.alloc_buffer((RB * G,), "float32")
            total = T.alloc_buffer((RB * G,), "float32")
            key_scores(qv, ck, scores, task, h, row0, b0 * L, nb)
            softmax(scores, task, peak, total, first, row0, b0 * L, nb)
            for r in range(T.min(RB, R - row0)):
                p = T.bind(T.min(first + row0 + r, C - 1))
                lo = T.bind(T.max(p + 1 - W, 0) if W > 0 else 0)
                for gc in range(G // GB):
                    acc = T.alloc_buffer((GB, D), "float32")
                    weighted_values(cv, scores, task, h, r * G + gc * GB, lo, p + 1, acc)
                    for i in T.unroll(GB):
                        for d in T.vectorized(D):
                            out[row0 + r, h * G + gc * GB + i, d] = acc[i, d] / total[r * G + gc * GB + i]

    return attention


def _attend_macros(RB: int, G: int, D: int, C: int, L: int, W: int, cache_dtype: str, R: int = 1):
    """T.macros of one task: a kv head h and the queries of `RB` rows from row0 (row r at position
    min(first + row0 + r, C - 1); rows past R repeat row R - 1), all G query heads of each, query
    i = r * G + g. `scores[srow]` is the task's [RB * G, C] scratch, indexed by position.

    key_scores: scores of every query over the positions t0 .. t0 + nb * L
    softmax: the rows' masked softmax over them, in place, with each query's max and sum
    weighted_values: acc[GB, D] = sum over lo <= t < hi of scores[srow, i0 + i, t] * cv[h, t]

    Loops start at 0 and add their offset: TVM 0.27 dropped the offset of a loop
    ``range(lo, hi)`` from the bounds of a loop inside it (wrong outputs, seen while writing these)."""
    Q = RB * G
    DC = _largest_divisor(D, KEY_ROWS)
    ahead = PREFETCH_POSITIONS
    neg_inf = T.float32(NEG_INF)

    @T.macro
    def key_scores(qv, ck, scores, srow, h, row0, t0, nb):
        span = T.bind(nb * L)
        for c in range(D // DC):
            for b in range(nb):
                # the position `ahead` on in reading order: along these rows, then the next rows
                # (a range shorter than that: the next rows at this position)
                a = T.bind(b * L + T.min(ahead, span))
                over = T.bind(a >= span)
                row = T.bind(T.min(c * DC + T.Select(over, DC, 0), D - DC))
                col = T.bind(T.min(t0 + T.Select(over, a - span, a), C - 1))
                for r in T.unroll(DC):
                    prefetch_l2(T.address_of(ck[h, row + r, col]))
                acc = T.alloc_buffer((Q, L), "float32")
                for i in T.unroll(Q):
                    for l in T.vectorized(L):
                        acc[i, l] = T.Select(c > 0, scores[srow, i, t0 + b * L + l], T.float32(0))
                for r in T.unroll(DC):
                    for i in T.unroll(Q):
                        qi = T.bind(qv[T.min(row0 + i // G, R - 1), h, i % G, c * DC + r])
                        for l in T.vectorized(L):
                            acc[i, l] = acc[i, l] + qi * T.Cast("float32", ck[h, c * DC + r, t0 + b * L + l])
                for i in T.unroll(Q):
                    for l in T.vectorized(L):
                        scores[srow, i, t0 + b * L + l] = acc[i, l]

    @T.macro
    def softmax(scores, srow, peak, total, first, row0, t0, nb):
        for i in range(Q):
            p = T.bind(T.min(first + T.min(row0 + i // G, R - 1), C - 1))
            start = T.bind(T.max(p + 1 - W, 0) if W > 0 else 0)
            vec = T.alloc_buffer((L,), "float32")
            for l in T.vectorized(L):
                vec[l] = neg_inf
            for b in range(nb):
                for l in T.vectorized(L):
                    t = T.bind(t0 + b * L + l)
                    vec[l] = T.max(vec[l], T.Select(t >= start and t <= p, scores[srow, i, t], neg_inf))
            peak[i] = neg_inf
            for l in T.unroll(L):
                peak[i] = T.max(peak[i], vec[l])
            for l in T.vectorized(L):
                vec[l] = T.float32(0)
            for b in range(nb):
                for l in T.vectorized(L):
                    t = T.bind(t0 + b * L + l)
                    scores[srow, i, t] = T.Select(t >= start and t <= p, exp_f32(scores[srow, i, t] - peak[i]),
                                                  T.float32(0))
                    vec[l] = vec[l] + scores[srow, i, t]
            total[i] = T.float32(0)
            for l in T.unroll(L):
                total[i] = total[i] + vec[l]

    GB = _value_group(G, D, L)

    @T.macro
    def weighted_values(cv, scores, srow, h, i0, lo, hi, acc):
        for i in T.unroll(GB):
            for d in T.vectorized(D):
                acc[i, d] = T.float32(0)
        for j in range(hi - lo):
            t = T.bind(lo + j)
            for i in T.unroll(GB):
                w = T.bind(scores[srow, i0 + i, t])
                for d in T.vectorized(D):
                    acc[i, d] = acc[i, d] + w * T.Cast("float32", cv[h, t, d])

    return key_scores, softmax, weighted_values
