"""int8 / int4 CPU kernels (dense and sparse-input) against numpy: odd sizes, sparsity 0 %, partial, 100 %.

The reference dequantizes the weights with the quantize pass's own numpy helpers, masks the
inactive inputs and multiplies in float64. Kernels are built lazily and cached per module.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tvm")

from actsparse.codegen.kernels.cpu import build_kernel  # noqa: E402
from actsparse.codegen.kernels.cpu import quant  # noqa: E402
from actsparse.codegen.kernels.reference import active_mask, dense_matmul_reference  # noqa: E402
from actsparse.codegen.targets import resolve_target  # noqa: E402
from actsparse.passes.quantize import dequantize_blockwise, quantize_blockwise, quantize_per_channel  # noqa: E402

ATOL = 2e-4
RTOL = 1e-4


@pytest.fixture(scope="module")
def kernels():
    """Build each kernel once: kernels(factory, *args, **kw) -> BuiltKernel."""
    target = resolve_target("host")
    cache = {}

    def get(factory, *args, **kw):
        key = (factory.__name__, args, tuple(sorted(kw.items())))
        if key not in cache:
            cache[key] = build_kernel(factory(*args, **kw), target)
        return cache[key]

    return get


def _case(m, k, n, seed):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((m, k)).astype(np.float32), rng.standard_normal((k, n)).astype(np.float32)


def _threshold(x, sparsity):
    """A threshold on |x| leaving about 1 - sparsity active, midway between two magnitudes."""
    if sparsity <= 0:
        return np.float32(-1.0)
    if sparsity >= 1:
        return np.float32(np.abs(x).max() + 1)
    ordered = np.sort(np.abs(x).ravel())
    cut = int(sparsity * ordered.size)
    return np.float32((ordered[cut - 1] + ordered[cut]) / 2)


def _mode_inputs(mode, x, sparsity, rng):
    """(x as the kernel sees it, extra kernel inputs, the masked x of the reference)."""
    if mode == "nonzero":
        x = np.where(np.abs(x) > _threshold(x, sparsity), x, 0).astype(np.float32)
        return x, [], x
    t = _threshold(x, sparsity)
    if mode == "threshold":
        return x, [np.array([t], np.float32)], np.where(active_mask(x, "threshold", t), x, 0)
    scale = np.abs(rng.standard_normal(x.shape[1])).astype(np.float32) + 0.5
    t = _threshold(x * scale, sparsity)
    return x, [np.array([t], np.float32), scale], np.where(active_mask(x, "scaled", t, scale), x, 0)


INT8_SHAPES = [(1, 37, 45), (1, 64, 96), (3, 300, 70)]
INT4_SHAPES = [(1, 37, 45), (1, 256, 96), (3, 300, 70)]  # k not a multiple of the group too


@pytest.mark.parametrize("shape", INT8_SHAPES)
def test_int8_dense_matches_numpy(kernels, shape):
    x, w = _case(*shape, sum(shape))
    q, s = quantize_per_channel(w)
    y = kernels(quant.int8_dense_matmul, *shape)(x, *quant.pack_int8_dense(q, s))
    np.testing.assert_allclose(y, dense_matmul_reference(x, q.astype(np.float32) * s), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("shape", INT4_SHAPES)
@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_dense_matches_numpy(kernels, shape, symmetric):
    m, k, n = shape
    x, w = _case(*shape, k + n)
    codes, scales, zeros = quantize_blockwise(w, 4, 32, symmetric)
    packed = quant.pack_int4_dense(codes, scales, None if symmetric else zeros, k=k)
    y = kernels(quant.int4_dense_matmul, m, k, n, 32, zero_points=not symmetric)(x, *packed)
    expected = dense_matmul_reference(x, dequantize_blockwise(codes, scales, zeros, 32, k))
    np.testing.assert_allclose(y, expected, atol=ATOL, rtol=RTOL)


SPARSE_CASES = [("threshold", (1, 37, 45)), ("threshold", (3, 300, 70)), ("nonzero", (1, 64, 96)),
                ("scaled", (2, 70, 33))]


@pytest.mark.parametrize("mode,shape", SPARSE_CASES)
@pytest.mark.parametrize("sparsity", [0.0, 0.6, 1.0])
def test_int8_sparse_matches_numpy(kernels, mode, shape, sparsity):
    rng = np.random.default_rng(7)
    x, w = _case(*shape, 3)
    x, extra, x_ref = _mode_inputs(mode, x, sparsity, rng)
    q, s = quantize_per_channel(w)
    y = kernels(quant.int8_sparse_matmul, *shape, mode)(x, *extra, *quant.pack_int8_sparse(q, s))
    np.testing.assert_allclose(y, dense_matmul_reference(x_ref, q.astype(np.float32) * s), atol=ATOL, rtol=RTOL)
    if sparsity >= 1 and mode != "nonzero":
        assert not y.any()


@pytest.mark.parametrize("mode,shape", SPARSE_CASES)
@pytest.mark.parametrize("sparsity", [0.0, 0.6, 1.0])
@pytest.mark.parametrize("symmetric", [pytest.param(True, marks=pytest.mark.slow), False])
def test_int4_sparse_matches_numpy(kernels, mode, shape, sparsity, symmetric):
    rng = np.random.default_rng(11)
    m, k, n = shape
    x, w = _case(*shape, 5)
    x, extra, x_ref = _mode_inputs(mode, x, sparsity, rng)
    codes, scales, zeros = quantize_blockwise(w, 4, 32, symmetric)
    packed = quant.pack_int4_sparse(codes, scales, None if symmetric else zeros, k=k)
    y = kernels(quant.int4_sparse_matmul, m, k, n, 32, mode, zero_points=not symmetric)(x, *extra, *packed)
    expected = dense_matmul_reference(x_ref, dequantize_blockwise(codes, scales, zeros, 32, k))
    np.testing.assert_allclose(y, expected, atol=ATOL, rtol=RTOL)


def test_int4_sparse_steps_never_straddle_groups(kernels):
    """Few active channels spread over many groups: each group's partial step is padded."""
    m, k, n = 1, 160, 40
    x, w = _case(m, k, n, 21)
    x[:, ::3] = 0  # nonzero pattern crossing every group boundary
    codes, scales, zeros = quantize_blockwise(w, 4, 32, False)
    y = kernels(quant.int4_sparse_matmul, m, k, n, 32, "nonzero", zero_points=True)(
        x, *quant.pack_int4_sparse(codes, scales, zeros, k=k))
    np.testing.assert_allclose(y, dense_matmul_reference(x, dequantize_blockwise(codes, scales, zeros, 32, k)),
                               atol=ATOL, rtol=RTOL)


def test_int4_packing_layout():
    """Byte j of a 2L-column block: column j in the low nibble, column j + L in the high one."""
    lanes, k, n = 4, 2, 8
    codes = np.arange(n * 32, dtype=np.uint8).reshape(n, 32) % 16  # [N, Kp] with group 32
    scales = np.ones((n, 1), np.float32)
    packed, _ = quant.pack_int4_sparse(codes, scales, k=k, lanes=lanes)
    assert packed.shape == (k, n // 2)
    for row in range(k):
        for j in range(lanes):
            assert packed[row, j] & 15 == codes[j, row]
            assert packed[row, j] >> 4 == codes[j + lanes, row]


def test_padded_columns_contribute_nothing():
    """Symmetric int4 pads columns with the zero code 8, so (8 - 8) * scale = 0."""
    codes = np.full((3, 32), 5, np.uint8)
    packed, scales = quant.pack_int4_sparse(codes, np.ones((3, 1), np.float32), k=32, lanes=4)
    assert packed.shape == (32, 4) and scales.shape == (1, 8)
    assert (packed[:, 1] >> 4 == 8).all() and (packed[:, 3] & 15 == 8).all()


def test_unknown_mode_is_rejected():
    with pytest.raises(ValueError, match="mode"):
        quant.int8_sparse_matmul(1, 8, 8, "magnitude")
