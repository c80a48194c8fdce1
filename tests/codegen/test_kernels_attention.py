"""The decode-attention kernel against a numpy reference: cache append, GQA groups, sliding
window, stale entries past the current length never read."""

from __future__ import annotations

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")

from actsparse.codegen.kernels.cpu.attention import cache_capacity, decode_attention  # noqa: E402
from actsparse.codegen.targets import resolve_target  # noqa: E402


def reference(q, keys, values, position, window):
    start = max(0, position + 1 - window) if window else 0
    scores = np.einsum("hgd,htd->hgt", q, keys[:, start:position + 1])
    scores -= scores.max(-1, keepdims=True)
    probs = np.exp(scores)
    probs /= probs.sum(-1, keepdims=True)
    return np.einsum("hgt,htd->hgd", probs, values[:, start:position + 1])


def compiled(func):
    """The PrimFunc built for this machine."""
    return tvm.compile(tvm.IRModule({"f": func.with_attr("global_symbol", "f")}), resolve_target("host"))["f"]


def stale_caches(kv: int, d: int, capacity: int):
    """Key cache [kv, d, capacity] and value cache [kv, capacity, d] full of garbage (a previous,
    longer sequence): only what the kernel writes may be read."""
    return (tvm.runtime.tensor(np.full((kv, d, capacity), 1e30, np.float32)),
            tvm.runtime.tensor(np.full((kv, capacity, d), 1e30, np.float32)))

def check_prefill_chunks(prefill_attention, kv, group, d, capacity, rows, window, seed):
    """Chunks of `rows` from position 0 to the capacity (the last one runs past it) over stale
    caches: every real row equals the reference, rows past the capacity neither written nor read,
    and the caches end up holding every key and value."""
    kernel = compiled(prefill_attention(kv, group, d, capacity, rows, window=window))
    rng = np.random.default_rng(seed)
    keys = rng.standard_normal((kv, capacity, d)).astype(np.float32)
    values = rng.standard_normal((kv, capacity, d)).astype(np.float32)
    cache_k, cache_v = stale_caches(kv, d, capacity)
    for first in range(0, capacity, rows):
        q = rng.standard_normal((rows, kv * group, d)).astype(np.float32)
        real = min(rows, capacity - first)
        k = np.zeros((rows, kv, d), np.float32)
        v = np.zeros((rows, kv, d), np.float32)
        k[:real] = keys[:, first:first + real].transpose(1, 0, 2)
        v[:real] = values[:, first:first + real].transpose(1, 0, 2)
        out = tvm.runtime.tensor(np.zeros((rows, kv * group, d), np.float32))
        kernel(tvm.runtime.tensor(q), tvm.runtime.tensor(k), tvm.runtime.tensor(v), cache_k, cache_v,
               tvm.runtime.tensor(np.array([first], np.int64)), out)
        for i in range(real):
            expected = reference(q[i].reshape(kv, group, d), keys, values, first + i, window).reshape(kv * group, d)
            np.testing.assert_allclose(out.numpy()[i], expected, atol=2e-5, rtol=1e-4, err_msg=f"row {first + i}")
    np.testing.assert_array_equal(cache_k.numpy(), keys.transpose(0, 2, 1))
    np.testing.assert_array_equal(cache_v.numpy(), values)



@pytest.mark.parametrize("kv,group,d,window", [(2, 3, 16, 0), (1, 4, 32, 0), (3, 1, 8, 5)])
def test_decode_attention_matches_numpy(kv, group, d, window):
    capacity = cache_capacity(40)
    assert capacity == 48
    kernel = compiled(decode_attention(kv, group, d, capacity, window=window))
    rng = np.random.default_rng(0)
    keys = rng.standard_normal((kv, capacity, d)).astype(np.float32)
    values = rng.standard_normal((kv, capacity, d)).astype(np.float32)
    cache_k, cache_v = stale_caches(kv, d, capacity)  # only 0..position may be read
    for position in range(40):
        q = rng.standard_normal((kv, group, d)).astype(np.float32)
        out = tvm.runtime.tensor(np.zeros((kv, group, d), np.float32))
        kernel(tvm.runtime.tensor(q), tvm.runtime.tensor(keys[:, position:position + 1]),
               tvm.runtime.tensor(values[:, position:position + 1]), cache_k, cache_v,
               tvm.runtime.tensor(np.array([position], np.int64)), out)
        np.testing.assert_allclose(out.numpy(), reference(q, keys, values, position, window), atol=2e-5, rtol=1e-4)
    np.testing.assert_array_equal(cache_k.numpy()[:, :, :40], keys[:, :40].transpose(0, 2, 1))
    np.testing.assert_array_equal(cache_v.numpy()[:, :40], values[:, :40])


def test_capacity_must_be_whole_vectors():
    with pytest.raises(ValueError, match="multiple"):
        decode_attention(1, 1, 8, 20)


@pytest.mark.parametrize("kv,group,d,window,rows", [(2, 3, 16, 0, 5), (1, 4, 32, 0, 8), (3, 1, 8, 5, 4)])
def test_prefill_attention_matches_numpy_row_by_row(kv, group, d, window, rows):
    """A chunk of rows equals the decode kernel's rows one by one: causal within the chunk, the
    chunk appended to what the cache holds, rows past the capacity neither written nor read."""
    from actsparse.codegen.kernels.cpu.attention import prefill_attention

    check_prefill_chunks(prefill_attention, kv, group, d, cache_capacity(20), rows, window, seed=1)  # capacity 32


@pytest.mark.parametrize("rows", [1, 6])
def test_float16_cache_rounds_on_write_and_computes_in_float32(rows):
    """Decode (rows 1) and prefill kernels over a float16 cache: what they store is the float16
    rounding of k and v, and the output equals float32 attention over those rounded values."""
    from actsparse.codegen.kernels.cpu.attention import prefill_attention

    kv, group, d, capacity = 2, 2, 16, cache_capacity(20)
    if rows == 1:
        func = decode_attention(kv, group, d, capacity, cache_dtype="float16")
    else:
        func = prefill_attention(kv, group, d, capacity, rows, cache_dtype="float16")
    kernel = compiled(func)
    rng = np.random.default_rng(5)
    keys = rng.standard_normal((kv, capacity, d)).astype(np.float32)
    values = rng.standard_normal((kv, capacity, d)).astype(np.float32)
    cache_k = tvm.runtime.tensor(np.zeros((kv, d, capacity), np.float16))
    cache_v = tvm.runtime.tensor(np.zeros((kv, capacity, d), np.float16))
    q = rng.standard_normal((rows, kv * group, d)).astype(np.float32)
    if rows == 1:
        args = (q.reshape(kv, group, d), keys[:, :1], values[:, :1])
    else:
        args = (q, keys[:, :rows].transpose(1, 0, 2).copy(), values[:, :rows].transpose(1, 0, 2).copy())
    out = tvm.runtime.tensor(np.zeros(args[0].shape, np.float32))
    kernel(*(tvm.runtime.tensor(np.ascontiguousarray(a)) for a in args), cache_k, cache_v,
           tvm.runtime.tensor(np.array([0], np.int64)), out)
    rounded_k, rounded_v = keys.astype(np.float16).astype(np.float32), values.astype(np.float16).astype(np.float32)
    np.testing.assert_array_equal(cache_k.numpy()[:, :, :rows], keys[:, :rows].astype(np.float16).transpose(0, 2, 1))
    for i in range(rows):
        expected = reference(q[i].reshape(kv, group, d), rounded_k, rounded_v, i, 0).reshape(kv * group, d)
        np.testing.assert_allclose(out.numpy().reshape(rows, kv * group, d)[i], expected, atol=2e-5, rtol=1e-4)


def test_unknown_cache_dtype_is_refused():
    with pytest.raises(ValueError, match="KV cache dtype"):
        decode_attention(1, 1, 8, 16, cache_dtype="int8")


@pytest.mark.parametrize("kv,group,d,window,dtype", [
    (5, 3, 64, 0, "float32"),  # SmolLM-360M's heads: 2 ranges per kv head past 128 positions
    (2, 3, 16, 100, "float32"),  # a window whose start crosses range edges
    (4, 1, 32, 0, "float32"),  # group 1 (multi-head attention)
    (1, 4, 128, 0, "float16"),  # group 4, head_dim 128, 8 ranges for one kv head
    (1, 8, 64, 37, "float16"),  # group 8: values in passes of fewer query heads
])
def test_decode_attention_over_ranges_matches_numpy(kv, group, d, window, dtype):
    """Every position up to the capacity: one range while p < 128, then several (p at, just before
    and just after a range edge, ranges of unequal length, the window's start anywhere), against
    numpy over the rounded cache; stale entries (inf in float16) never reach the output."""
    capacity = cache_capacity(300)  # 304: ranges of 8..19 vectors
    kernel = compiled(decode_attention(kv, group, d, capacity, window=window, cache_dtype=dtype))
    rng = np.random.default_rng(2)
    keys = rng.standard_normal((kv, capacity, d)).astype(np.float32)
    values = rng.standard_normal((kv, capacity, d)).astype(np.float32)
    rounded_k, rounded_v = keys.astype(dtype).astype(np.float32), values.astype(dtype).astype(np.float32)
    stale = np.float32(1e30) if dtype == "float32" else np.inf
    cache_k = tvm.runtime.tensor(np.full((kv, d, capacity), stale, dtype))
    cache_v = tvm.runtime.tensor(np.full((kv, capacity, d), stale, dtype))
    for position in range(capacity):
        q = (rng.standard_normal((kv, group, d)) * 2 / np.sqrt(d)).astype(np.float32)  # scaled, as the model's
        out = tvm.runtime.tensor(np.zeros((kv, group, d), np.float32))
        kernel(tvm.runtime.tensor(q), tvm.runtime.tensor(keys[:, position:position + 1]),
               tvm.runtime.tensor(values[:, position:position + 1]), cache_k, cache_v,
               tvm.runtime.tensor(np.array([position], np.int64)), out)
        expected = reference(q.astype(np.float64), rounded_k, rounded_v, position, window)
        np.testing.assert_allclose(out.numpy(), expected, atol=2e-5, rtol=1e-4, err_msg=f"position {position}")


@pytest.mark.parametrize("kv,group,d,window,rows", [(1, 8, 128, 0, 7), (2, 1, 32, 0, 16), (1, 3, 64, 40, 32)])
def test_prefill_attention_groups_and_long_chunks_match_numpy(kv, group, d, window, rows):
    """Prefill tasks of several rows: group 8 with head_dim 128 (2 rows a task, values in passes of 2
    query heads, a last task of 1 row), group 1 (16 rows a task), 32-row chunks with a window."""
    from actsparse.codegen.kernels.cpu.attention import prefill_attention

    check_prefill_chunks(prefill_attention, kv, group, d, cache_capacity(100), rows, window, seed=3)  # capacity 112
