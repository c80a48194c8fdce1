"""One decode step of causal attention over a preallocated KV cache, for CPUs.

    q   [kv_heads, group, head_dim]   already scaled (1/sqrt(head_dim) folded in before)
    k,v [kv_heads, 1, head_dim]       this token's key and value
    ck  [kv_heads, head_dim, capacity]  keys, stored transposed: the score loop runs over
                                        positions, contiguous, so it vectorizes
    cv  [kv_heads, capacity, head_dim]  values, one contiguous row per position
    pos [1] int64                     this token's position p (the cache holds 0 .. p-1)
    out [kv_heads, group, head_dim]   softmax(q · ck[:, :, 0..p]) · cv[:, 0..p, :]

The kernel first writes k and v into the cache at p (the cache is runtime state owned by the
caller, not a value of the graph), then each (kv head, group member) pair is one parallel task
over positions 0..p (from p + 1 - window with a sliding window). The work is proportional to
the current length p + 1, not to the capacity. Scores are computed whole vectors at a time up
to the next multiple of `lanes`: capacity must be a multiple of `lanes` (the entries past p
are finite leftovers or zeros, and are masked out of the softmax).

`prefill_attention` is the same computation for a chunk of R prompt tokens at positions
p .. p + R - 1: it writes the chunk's keys and values first, then row i attends to 0 .. p + i
(causal within the chunk). Rows past the capacity (padding of a short last chunk) are neither
written nor meaningful.
"""

from __future__ import annotations

from tvm.script import tirx as T

from actsparse.codegen.kernels.cpu.fastmath import exp_f32


def cache_capacity(max_context: int, lanes: int = 16) -> int:
    """Positions the cache holds: max_context rounded up to whole vectors."""
    return -(-max_context // lanes) * lanes


CACHE_DTYPES = ("float32", "float16")


def _check_cache(capacity: int, lanes: int, dtype: str) -> None:
    if capacity % lanes:
        raise ValueError(f"capacity {capacity} is not a multiple of {lanes} lanes")
    if dtype not in CACHE_DTYPES:
        raise ValueError(f"KV cache dtype {dtype!r}: expected one of {', '.join(CACHE_DTYPES)}")


def decode_attention(kv_heads: int, group: int, head_dim: int, capacity: int, *, window: int = 0,
                     lanes: int = 16, cache_dtype: str = "float32"):
    """The PrimFunc (see the module docstring). `window` > 0 attends to the last `window` positions.
    `cache_dtype` float16 halves the cache's bytes: keys and values are rounded as they are
    written and widened to float32 as they are read (all arithmetic stays float32)."""
    _check_cache(capacity, lanes, cache_dtype)
    KV, G, D, C, L, W = kv_heads, group, head_dim, capacity, lanes, window
    tasks = KV * G
    attend = _attend_macro(G, D, C, L, W)

    @T.prim_func
    def attention(q: T.Buffer((KV, G, D), "float32"), k: T.Buffer((KV, 1, D), "float32"),
                  v: T.Buffer((KV, 1, D), "float32"), ck: T.Buffer((KV, D, C), cache_dtype),
                  cv: T.Buffer((KV, C, D), cache_dtype), pos: T.Buffer((1,), "int64"),
                  out: T.Buffer((KV, G, D), "float32")):
        T.func_attr({"tir.noalias": True})
        scores = T.alloc_buffer((tasks, C), "float32")
        p = T.bind(T.Cast("int32", T.max(T.min(pos[0], T.int64(C - 1)), T.int64(0))))
        for h in range(KV):
            for d in range(D):
                ck[h, d, p] = T.Cast(cache_dtype, k[h, 0, d])
                cv[h, p, d] = T.Cast(cache_dtype, v[h, 0, d])
        for task in T.parallel(tasks):
            attend(q, ck, cv, out, scores, task, task // G, task // G, task % G, p)

    return attention


def prefill_attention(kv_heads: int, group: int, head_dim: int, capacity: int, rows: int, *, window: int = 0,
                      lanes: int = 16, cache_dtype: str = "float32"):
    """Causal attention of `rows` prompt tokens (see the module docstring):
    ``(q: f32[rows, kv*group, D], k, v: f32[rows, kv, D], ck, cv (the cache), pos: i64[1] (the first
    row's position), out: f32[rows, kv*group, D])``; query head j reads kv head j // group."""
    _check_cache(capacity, lanes, cache_dtype)
    KV, G, D, C, R = kv_heads, group, head_dim, capacity, rows
    heads = KV * G
    attend = _attend_macro(G, D, C, lanes, window)

    @T.prim_func
    def attention(q: T.Buffer((R, heads, D), "float32"), k: T.Buffer((R, KV, D), "float32"),
                  v: T.Buffer((R, KV, D), "float32"), ck: T.Buffer((KV, D, C), cache_dtype),
                  cv: T.Buffer((KV, C, D), cache_dtype), pos: T.Buffer((1,), "int64"),
                  out: T.Buffer((R, heads, D), "float32")):
        T.func_attr({"tir.noalias": True})
        scores = T.alloc_buffer((R * heads, C), "float32")
        first = T.bind(T.Cast("int32", T.max(T.min(pos[0], T.int64(C - 1)), T.int64(0))))
        for i in range(R):
            if first + i < C:
                for h in range(KV):
                    for d in range(D):
                        ck[h, d, first + i] = T.Cast(cache_dtype, k[i, h, d])
                        cv[h, first + i, d] = T.Cast(cache_dtype, v[i, h, d])
        for task in T.parallel(R * heads):
            row = T.bind(task // heads)
            attend(q, ck, cv, out, scores, task, row, task % heads // G, task % heads, T.min(first + row, C - 1))

    return attention


def _attend_macro(G: int, D: int, C: int, L: int, W: int):
    """T.macro: out[row, j] = softmax over positions start .. p of q[row, j] · the keys of kv head h,
    times its values; `scores[task]` is this task's scratch row. (Decode: row, j = kv head, group
    member; prefill: row, j = token, query head.)"""
    neg_inf = T.float32(-3.0e38)

    @T.macro
    def attend(q, ck, cv, out, scores, task, row, h, j, p):
        start = T.bind(T.max(p + 1 - W, 0) if W > 0 else 0)
        first = T.bind(start // L)
        blocks = T.bind((p + L) // L)  # whole vectors covering positions 0 .. p
        peak = T.alloc_buffer((1,), "float32")
        total = T.alloc_buffer((1,), "float32")
        peak[0] = neg_inf
        total[0] = T.float32(0)
        for b in range(first, blocks):
            for l in T.vectorized(L):
                scores[task, b * L + l] = T.float32(0)
            for d in range(D):
                for l in T.vectorized(L):
                    scores[task, b * L + l] = scores[task, b * L + l] + q[row, j, d] * T.Cast("float32", ck[h, d, b * L + l])
            for l in range(L):
                t = T.bind(b * L + l)
                peak[0] = T.Select(t >= start and t <= p, T.max(peak[0], scores[task, t]), peak[0])
        for b in range(first, blocks):
            for l in T.vectorized(L):
                t = T.bind(b * L + l)
                scores[task, t] = T.Select(t >= start and t <= p, exp_f32(scores[task, t] - peak[0]), T.float32(0))
            for l in range(L):
                total[0] = total[0] + scores[task, b * L + l]
        for d in T.vectorized(D):
            out[row, j, d] = T.float32(0)
        for t in range(start, p + 1):
            for d in T.vectorized(D):
                out[row, j, d] = out[row, j, d] + scores[task, t] * T.Cast("float32", cv[h, t, d])
        for d in T.vectorized(D):
            out[row, j, d] = out[row, j, d] / total[0]

    return attend
