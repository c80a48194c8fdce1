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
from actsparse.passes.quant_numerics import dequantize_blockwise, quantize_blockwise, quantize_per_channel  # noqa: E402

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


def _int4_vnni_reference(x, codes, scales, zeros, group, k):
    """What int4_dense_matmul_vnni computes: x rounded to int8 per group (scale max|x|/127), integer
    dot products with the codes, then scale * s_x * (dot - zero * sum x_q) per group."""
    m = x.shape[0]
    n, kp = codes.shape
    xp = np.zeros((m, kp), np.float64)
    xp[:, :k] = x
    y = np.zeros((m, n))
    for g in range(kp // group):
        xg = xp[:, g * group:(g + 1) * group]
        sx = np.abs(xg).max(axis=1, keepdims=True) / 127
        xq = np.round(np.divide(xg, sx, out=np.zeros_like(xg), where=sx > 0)).astype(np.int64)
        dots = xq @ codes[:, g * group:(g + 1) * group].T.astype(np.int64)
        y += scales[:, g] * sx * (dots - zeros[:, g].astype(np.float64) * xq.sum(axis=1, keepdims=True))
    return y.astype(np.float32)


@pytest.mark.parametrize("shape,group", [((1, 37, 45), 32), ((1, 256, 96), 64), ((2, 300, 70), 128)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_dense_vnni_matches_numpy(kernels, shape, group, symmetric):
    if not quant.has_int8_dot_product(resolve_target("host")):
        pytest.skip("this CPU has no AVX-512 VNNI")
    m, k, n = shape
    x, w = _case(*shape, k + n + group)
    codes, scales, zeros = quantize_blockwise(w, 4, group, symmetric)
    packed = quant.pack_int4_dense_vnni(codes, scales, None if symmetric else zeros, k=k, group=group)
    y = kernels(quant.int4_dense_matmul_vnni, m, k, n, group, zero_points=not symmetric)(x, *packed)
    np.testing.assert_allclose(y, _int4_vnni_reference(x, codes, scales, zeros, group, k), atol=ATOL, rtol=RTOL)
    # and the int8 rounding of x costs little against the float weights it stands for
    exact = dense_matmul_reference(x, dequantize_blockwise(codes, scales, zeros, group, k))
    assert np.abs(y - exact).max() <= 0.02 * np.abs(exact).max()


def test_int4_vnni_rejects_groups_it_cannot_vectorize():
    with pytest.raises(ValueError, match="multiple of 32"):
        quant.int4_dense_matmul_vnni(1, 64, 64, 16)


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


@pytest.mark.parametrize("mode,shape", [("threshold", (1, 37, 45)), ("nonzero", (1, 64, 96))])
@pytest.mark.parametrize("sparsity", [0.0, 0.6, 1.0])
def test_int8_sparse_plain_row_schedule_matches_numpy(mode, shape, sparsity):
    """The batch-1 int8 kernel as built for non-x86 targets (one serial list, no prefetch)."""
    from actsparse.codegen.kernels.cpu.schedule import PLAIN_ROWS

    rng = np.random.default_rng(17)
    x, w = _case(*shape, 4)
    x, extra, x_ref = _mode_inputs(mode, x, sparsity, rng)
    q, s = quantize_per_channel(w)
    kernel = build_kernel(quant.int8_sparse_matmul(*shape, mode, schedule=PLAIN_ROWS), resolve_target("host"))
    y = kernel(x, *extra, *quant.pack_int8_sparse(q, s))
    np.testing.assert_allclose(y, dense_matmul_reference(x_ref, q.astype(np.float32) * s), atol=ATOL, rtol=RTOL)


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


def _int8_sparse_vnni_reference(x_active, q, scale):
    """What int8_sparse_matmul_vnni computes: the active x rounded to int8 per token (scale
    max|x| / 127), an integer product with the int8 codes, then s_x * scale per column."""
    sx = np.abs(x_active).max() / 127
    xq = np.round(np.divide(x_active, sx, out=np.zeros_like(x_active, np.float64), where=sx > 0))
    return ((xq @ q.astype(np.float64)) * sx * scale).astype(np.float32)


VNNI_SPARSE_CASES = [("threshold", 37, 45), ("threshold", 300, 70), ("nonzero", 64, 96), ("scaled", 70, 33),
                     ("threshold", 131, 200)]


@pytest.mark.parametrize("mode,k,n", VNNI_SPARSE_CASES)
@pytest.mark.parametrize("sparsity", [0.0, 0.6, 1.0])
def test_int8_sparse_vnni_matches_numpy(kernels, mode, k, n, sparsity):
    if not quant.has_int8_dot_product(resolve_target("host")):
        pytest.skip("this CPU has no AVX-512 VNNI")
    rng = np.random.default_rng(k + n)
    x, w = _case(1, k, n, k * n)
    x, extra, x_ref = _mode_inputs(mode, x, sparsity, rng)
    q, s = quantize_per_channel(w)
    y = kernels(quant.int8_sparse_matmul_vnni, k, n, mode)(x, *extra, *quant.pack_int8_sparse_vnni(q, s))
    np.testing.assert_allclose(y, _int8_sparse_vnni_reference(x_ref.astype(np.float64), q, s), atol=ATOL, rtol=RTOL)
    exact = dense_matmul_reference(x_ref, q.astype(np.float32) * s)
    assert np.abs(y - exact).max() <= 0.02 * max(np.abs(exact).max(), 1e-6)  # the cost of rounding x to int8
    if sparsity >= 1 and mode != "nonzero":
        assert not y.any()


@pytest.mark.parametrize("lines", [0, 1, 3])
@pytest.mark.parametrize("sparsity", [0.0, 0.6, 1.0])
def test_int8_sparse_vnni_listing_prefetch_leaves_results_alone(kernels, lines, sparsity):
    """The prefetch while listing (of rows listed so far; of the channel itself before the first
    active one) only moves data: every line count gives the reference result. k=300, n=70: two
    64-byte lines per row, so at 3 lines per channel the prefetch runs ahead of the list and clamps."""
    if not quant.has_int8_dot_product(resolve_target("host")):
        pytest.skip("this CPU has no AVX-512 VNNI")
    k, n = 300, 70
    rng = np.random.default_rng(lines)
    x, w = _case(1, k, n, 5)
    x, extra, x_ref = _mode_inputs("threshold", x, sparsity, rng)
    q, s = quantize_per_channel(w)
    kernel = kernels(quant.int8_sparse_matmul_vnni, k, n, "threshold", listing_prefetch_lines=lines)
    y = kernel(x, *extra, *quant.pack_int8_sparse_vnni(q, s))
    np.testing.assert_allclose(y, _int8_sparse_vnni_reference(x_ref.astype(np.float64), q, s), atol=ATOL, rtol=RTOL)


VNNI_ROWS_SHAPES = [(1, 37, 45), (5, 300, 70), (7, 64, 64), (32, 131, 200), (4, 16, 130)]  # row tile 3


@pytest.mark.parametrize("m,k,n", VNNI_ROWS_SHAPES)
def test_int8_vnni_rows_matches_numpy_and_the_one_row_kernel(kernels, m, k, n):
    """Every row as the one-row VNNI kernel computes it with every input active: x rounded to int8
    per row, exact integer sums. A zero row gives zeros (s_x = 0)."""
    if not quant.has_int8_dot_product(resolve_target("host")):
        pytest.skip("this CPU has no AVX-512 VNNI")
    x, w = _case(m, k, n, m * k + n)
    x[m // 2] = 0
    q, s = quantize_per_channel(w)
    packed = quant.pack_int8_sparse_vnni(q, s)
    y = kernels(quant.int8_vnni_rows_matmul, m, k, n)(x, *packed)
    expected = np.concatenate([_int8_sparse_vnni_reference(row[None].astype(np.float64), q, s) for row in x])
    np.testing.assert_allclose(y, expected, atol=ATOL, rtol=RTOL)
    assert not y[m // 2].any()
    one_row = kernels(quant.int8_sparse_matmul_vnni, k, n, "nonzero")
    np.testing.assert_array_equal(y, np.concatenate([one_row(row[None], *packed) for row in x]))
    exact = dense_matmul_reference(x, q.astype(np.float32) * s)
    assert np.abs(y - exact).max() <= 0.02 * np.abs(exact).max()  # the cost of rounding x to int8


def test_prompt_chunks_of_vnni_int8_layers_take_the_multi_row_kernel():
    """quant_kernel at m > 1 over the VNNI int8 weights: the multi-row kernel (x, u8 rows, scale, y),
    only where every input counts (the chunk's mode nonzero); thresholds are for batch-1 steps."""
    from actsparse.codegen.lowering.quant import quant_kernel

    func = quant_kernel("int8", "nonzero", 32, 64, 70, 0, False, 16, int8_dot=True)
    assert [(tuple(int(d) for d in p.shape), str(p.dtype)) for p in func.params] == [
        ((32, 64), "float32"), ((64, 128), "uint8"), ((128,), "float32"), ((32, 70), "float32")]
    with pytest.raises(ValueError, match="every input"):
        quant_kernel("int8", "threshold", 32, 64, 70, 0, False, 16, int8_dot=True)


def test_int8_sparse_vnni_packing_layout():
    """Inside a 64-column block, byte 4i + t of a row holds column 16t + i, offset by +128."""
    q = (np.arange(2 * 70) % 200 - 100).astype(np.int8).reshape(2, 70)
    rows, scale = quant.pack_int8_sparse_vnni(q, np.ones(70, np.float32))
    assert rows.shape == (2, 128) and rows.dtype == np.uint8 and scale.shape == (128,)
    for col in range(70):
        block, within = divmod(col, 64)
        t, i = divmod(within, 16)
        assert (rows[:, 64 * block + 4 * i + t].astype(np.int16) - 128 == q[:, col]).all()


def test_unknown_mode_is_rejected():
    with pytest.raises(ValueError, match="mode"):
        quant.int8_sparse_matmul(1, 8, 8, "magnitude")


# ------------------------------------------------------- lowering: quantized ONNX -> our kernels

D = 64
LOWERING_CASES = {
    # passes -> (kernels expected on the 6 linears of the 2-layer SwiGLU stack, tolerance vs ORT)
    "int8_static": ("quantize{bits=8}", ["int8_dense"] * 6, 5e-2),
    # dynamic: the same int8 weights as static; the float-activation reference comes from the static model
    "int8_dynamic": ("quantize{bits=8,mode=dynamic}", ["int8_dense"] * 6, 5e-2, "quantize{bits=8}"),
    "int8_relu": ("relufy,quantize{bits=8}", ["int8_dense", "int8_dense", "int8_sparse_nonzero"] * 2, 5e-2),
    # ORT's activation rounding moves layer 1's inputs across the WINA thresholds: a looser bound
    "int8_wina": ("sparsify{method=wina,sparsity=0.5,scope=ffn},quantize{bits=8}", ["int8_sparse_scaled"] * 6, 0.15),
    # on AVX-512 VNNI hosts: the batch-1 sparse int8 layers round x to int8 in the kernel
    "int8_relu_vnni": ("relufy,quantize{bits=8}", ["int8_dense", "int8_dense", "int8_sparse_nonzero_vnni"] * 2, 5e-2),
    "int8_teal_dynamic_vnni": ("sparsify{method=teal,sparsity=0.5,scope=ffn},quantize{bits=8,mode=dynamic}",
                               ["int8_sparse_threshold_vnni"] * 6, 0.15, "sparsify{method=teal,sparsity=0.5,scope=ffn},"
                                                                          "quantize{bits=8}"),
    "int4": ("quantize{bits=4,group=32,accuracy_level=0}", ["int4_dense"] * 6, 1e-4),
    "int4_teal_asym": ("sparsify{method=teal,sparsity=0.5,scope=ffn},"
                       "quantize{bits=4,group=32,symmetric=false,accuracy_level=0}", ["int4_sparse_threshold"] * 6, 1e-4),
    # on AVX-512 VNNI hosts with accuracy_level 4 (x rounded to int8 per group, as ORT does)
    "int4_teal_vnni": ("sparsify{method=teal,sparsity=0.5,scope=ffn},quantize{bits=4,group=32}",
                       ["int4_sparse_threshold_vnni"] * 6, 0.05),
    "int4_relu": ("relufy,quantize{bits=4,group=32,accuracy_level=0}",
                  ["int4_dense", "int4_dense", "int4_sparse_nonzero"] * 2, 1e-4),
}


def _with_converters(target):
    """Stand-in for the one-line hook in relax_import._our_converters: add ours to from_onnx's table."""
    import contextlib

    from tvm.relax.frontend.onnx import onnx_frontend

    from actsparse.codegen.lowering.quant import quant_converters

    @contextlib.contextmanager
    def patched():
        original = onnx_frontend._get_convert_map
        onnx_frontend._get_convert_map = lambda: dict(original()) | quant_converters(target)
        try:
            yield
        finally:
            onnx_frontend._get_convert_map = original

    return patched()


def _int4_sparse_vnni_reference(x_active, codes, scales, zeros, group, k):
    """What int4_sparse_matmul_vnni computes: the dense VNNI kernel's arithmetic over the active
    inputs (x rounded to int8 per group with the group's max over active inputs)."""
    return _int4_vnni_reference(x_active, codes, scales, zeros, group, k)


INT4_VNNI_SPARSE_CASES = [("threshold", 37, 45, 32), ("threshold", 300, 70, 64), ("nonzero", 256, 130, 128),
                          ("scaled", 70, 33, 32), ("threshold", 131, 200, 32)]


@pytest.mark.parametrize("mode,k,n,group", INT4_VNNI_SPARSE_CASES)
@pytest.mark.parametrize("sparsity", [0.0, 0.6, 1.0])
@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_sparse_vnni_matches_numpy(kernels, mode, k, n, group, sparsity, symmetric):
    if not quant.has_int8_dot_product(resolve_target("host")):
        pytest.skip("this CPU has no AVX-512 VNNI")
    rng = np.random.default_rng(k + n + group)
    x, w = _case(1, k, n, k * n)
    x, extra, x_ref = _mode_inputs(mode, x, sparsity, rng)
    codes, scales, zeros = quantize_blockwise(w, 4, group, symmetric)
    packed = quant.pack_int4_sparse_vnni(codes, scales, None if symmetric else zeros, k=k)
    y = kernels(quant.int4_sparse_matmul_vnni, k, n, group, mode, zero_points=not symmetric)(x, *extra, *packed)
    np.testing.assert_allclose(y, _int4_sparse_vnni_reference(x_ref, codes, scales, zeros, group, k),
                               atol=ATOL, rtol=RTOL)
    exact = dense_matmul_reference(x_ref, dequantize_blockwise(codes, scales, zeros, group, k))
    assert np.abs(y - exact).max() <= 0.02 * max(np.abs(exact).max(), 1e-6)  # the cost of rounding x to int8
    if sparsity >= 1 and mode != "nonzero":
        assert not y.any()


def test_int4_sparse_vnni_steps_never_straddle_groups(kernels):
    """Few active channels in every group, 3 tasks over 5 groups, 8-row steps: each group's
    partial step is padded and folded with its own scale."""
    if not quant.has_int8_dot_product(resolve_target("host")):
        pytest.skip("this CPU has no AVX-512 VNNI")
    k, n, group = 160, 40, 32
    x, w = _case(1, k, n, 21)
    x[:, ::3] = 0
    codes, scales, zeros = quantize_blockwise(w, 4, group, False)
    kernel = kernels(quant.int4_sparse_matmul_vnni, k, n, group, "nonzero", zero_points=True, chunks=3)
    y = kernel(x, *quant.pack_int4_sparse_vnni(codes, scales, zeros, k=k))
    np.testing.assert_allclose(y, _int4_vnni_reference(x, codes, scales, zeros, group, k), atol=ATOL, rtol=RTOL)


INT4_VNNI_ROWS_SHAPES = [(1, 37, 45, 32), (5, 300, 70, 64), (7, 64, 64, 32), (32, 131, 200, 32), (4, 256, 130, 128)]


@pytest.mark.parametrize("m,k,n,group", INT4_VNNI_ROWS_SHAPES)
@pytest.mark.parametrize("symmetric", [True, False])
def test_int4_vnni_rows_matches_numpy_and_the_one_row_kernel(kernels, m, k, n, group, symmetric):
    """Every row as the one-row int4 VNNI kernel computes it with every input active; a zero row
    gives zeros."""
    if not quant.has_int8_dot_product(resolve_target("host")):
        pytest.skip("this CPU has no AVX-512 VNNI")
    x, w = _case(m, k, n, m * k + n)
    x[m // 2] = 0
    codes, scales, zeros = quantize_blockwise(w, 4, group, symmetric)
    packed = quant.pack_int4_sparse_vnni(codes, scales, None if symmetric else zeros, k=k)
    y = kernels(quant.int4_vnni_rows_matmul, m, k, n, group, zero_points=not symmetric)(x, *packed)
    np.testing.assert_allclose(y, _int4_vnni_reference(x, codes, scales, zeros, group, k), atol=ATOL, rtol=RTOL)
    assert not y[m // 2].any()
    one_row = kernels(quant.int4_sparse_matmul_vnni, k, n, group, "nonzero", zero_points=not symmetric)
    np.testing.assert_allclose(y, np.concatenate([one_row(row[None], *packed) for row in x]), atol=1e-5, rtol=1e-6)


def test_prompt_chunks_of_vnni_int4_sparse_layers_take_the_multi_row_kernel():
    """quant_kernel over the int4 sparse VNNI weights: one row -> the one-row kernel with the
    threshold, m rows -> the multi-row kernel (x, codes, scales, y) in mode nonzero only."""
    from actsparse.codegen.lowering.quant import quant_kernel

    one = quant_kernel("int4", "threshold", 1, 64, 70, 32, False, 16, int8_dot=True)
    assert [tuple(int(d) for d in p.shape) for p in one.params] == [(1, 64), (1,), (64, 64), (2, 128), (1, 70)]
    rows = quant_kernel("int4", "nonzero", 32, 64, 70, 32, False, 16, int8_dot=True)
    assert [(tuple(int(d) for d in p.shape), str(p.dtype)) for p in rows.params] == [
        ((32, 64), "float32"), ((64, 64), "uint8"), ((2, 128), "float32"), ((32, 70), "float32")]
    with pytest.raises(ValueError, match="every input"):
        quant_kernel("int4", "threshold", 32, 64, 70, 32, False, 16, int8_dot=True)


def test_int4_sparse_vnni_packing_layout():
    """In a 128-column block, byte 4i + t of a row holds column 16t + i (low nibble) and column
    64 + 16t + i (high nibble); padded columns hold the symmetric zero code 8."""
    k, n, group = 3, 150, 32
    codes = (np.arange(n * group) % 16).astype(np.uint8).reshape(n, group)
    rows, scales = quant.pack_int4_sparse_vnni(codes, np.ones((n, 1), np.float32), k=k)
    assert rows.shape == (k, 128) and scales.shape == (1, 256)
    for col in range(256):
        block, within = divmod(col, 128)
        half, rest = divmod(within, 64)
        t, i = divmod(rest, 16)
        byte = rows[:, 64 * block + 4 * i + t]
        code = (byte >> 4) if half else (byte & 15)
        np.testing.assert_array_equal(code, codes[col, :k] if col < n else 8)


def _float_activations(proto):
    """The quantized model with the activations' Q/DQ pairs and DynamicQuantizeLinear removed
    (weights stay quantized): what our kernels compute, to compare with tightly."""
    import onnx

    proto = onnx.ModelProto.FromString(proto.SerializeToString())
    producers = {out: node for node in proto.graph.node for out in node.output}
    inits = {t.name for t in proto.graph.initializer}
    rename = {}
    for node in proto.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] not in inits:
            q = producers.get(node.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                rename[node.output[0]] = q.input[0]
    for node in proto.graph.node:
        node.input[:] = [rename.get(name, name) for name in node.input]
    return proto


@pytest.fixture(scope="module", params=list(LOWERING_CASES))
def lowered(request):
    """(case, quantized ONNX, its float-activation reference ONNX, compiled run(x), kernel plan)."""
    import onnx_ir as ir
    import tvm
    from tvm import relax

    import actsparse
    from actsparse.codegen.lower import specialize_shapes, to_relax
    from actsparse.codegen.lowering.quant import select_quant_kernels
    from actsparse.frontend.zoo import swiglu_stack

    passes, *_, reference_passes = (*LOWERING_CASES[request.param], None)[:4]
    rng = np.random.default_rng(2)
    calib = [{"x": rng.standard_normal((1, D)).astype(np.float32)} for _ in range(8)]
    optimized = actsparse.optimize(swiglu_stack(), passes=passes, calib=calib)
    reference = optimized if reference_passes is None else actsparse.optimize(swiglu_stack(), passes=reference_passes,
                                                                              calib=calib)
    model = ir.serde.deserialize_model(ir.serde.serialize_model(optimized.model))
    model = specialize_shapes(model, {"x": (1, D)})
    target = resolve_target("host")
    int8_dot = request.param.endswith("_vnni")
    if int8_dot and not quant.has_int8_dot_product(target):
        pytest.skip("this CPU has no AVX-512 VNNI")
    plan = select_quant_kernels(model, int8_dot=int8_dot)
    with _with_converters(target):
        mod, params = to_relax(model, target)
    vm = relax.VirtualMachine(tvm.compile(mod, target), tvm.cpu())
    weights = [tvm.runtime.tensor(p) for p in params["main"]]
    return (request.param, optimized.to_onnx(), _float_activations(reference.to_onnx()),
            lambda x: vm["main"](tvm.runtime.tensor(x), *weights).numpy(), plan)


def _ort_run(proto, x, optimize: bool = True):
    """ORT's result; optimize=False runs every node as written (no integer-matmul fusions)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if not optimize:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


@pytest.mark.slow
def test_lowered_quantized_model_matches_onnxruntime(lowered):
    case, proto, reference, run, plan = lowered
    expected_kernels, tolerance = LOWERING_CASES[case][1:3]
    assert [entry["kernel"] for entry in plan] == expected_kernels
    rng = np.random.default_rng(5)
    for _ in range(2):
        x = rng.standard_normal((1, D)).astype(np.float32)
        y = run(x)
        scale = np.abs(_ort_run(proto, x)).max()
        # vs ORT's own (integer) path: differs by the activation rounding ORT does and we skip
        assert np.abs(y - _ort_run(proto, x)).max() <= tolerance * scale
        # vs the same weights with float activations: only float rounding (the VNNI kernels round
        # x to int8 themselves, which moves later layers' inputs across thresholds as ORT's does)
        float_tolerance = tolerance if case.endswith("_vnni") else 1e-4
        np.testing.assert_allclose(y, _ort_run(reference, x, optimize=False), atol=float_tolerance * scale, rtol=0)


@pytest.mark.parametrize("quantize", ["quantize{bits=8,mode=dynamic}", "quantize{bits=4,group=32}"])
def test_vnni_layers_reading_one_sparsified_input_share_one_kernel(quantize):
    """gate and up read one Sparsify output: with int8_dot they become one node over their packed
    weights side by side (concatenated, then packed once), sliced per layer; the plan
    still lists every layer. Without int8_dot (other kernels' layouts) nothing is shared."""
    import onnx_ir as ir

    import actsparse
    from actsparse.codegen.lower import specialize_shapes
    from actsparse.codegen.lowering.ops import QUANT_LINEAR
    from actsparse.codegen.lowering.quant import select_quant_kernels
    from actsparse.frontend.zoo import swiglu_stack

    rng = np.random.default_rng(3)
    calib = [{"x": rng.standard_normal((1, D)).astype(np.float32)} for _ in range(8)]
    optimized = actsparse.optimize(swiglu_stack(f=150), passes="sparsify{method=teal,sparsity=0.5,scope=ffn}," + quantize,
                                   calib=calib)
    for int8_dot in (True, False):
        model = specialize_shapes(ir.serde.deserialize_model(ir.serde.serialize_model(optimized.model)), {"x": (1, D)})
        plan = select_quant_kernels(model, int8_dot=int8_dot)
        assert len(plan) == 6 and all(entry["shape"] in ([D, 150], [150, D]) for entry in plan)
        kernels = [node for node in model.graph if node.op_type == QUANT_LINEAR]
        if not int8_dot:
            assert len(kernels) == 6
            continue
        assert len(kernels) == 4  # per layer: gate + up together, down alone
        shared = [node for node in kernels if "layers" in node.attributes]
        assert len(shared) == 2
        for node in shared:
            gate, up = node.attributes.get_strings("layers")
            assert "gate_proj" in gate and "up_proj" in up
            assert list(node.attributes.get_ints("parts")) == [150, 150]
            assert list(node.attributes.get_ints("offsets")) == [0, 150]
            assert node.attributes.get_int("n") == 300
            slices = [use.node for use in node.outputs[0].uses()]
            assert sorted(n.op_type for n in slices) == ["Slice", "Slice"]


def test_unpack_nibbles_low_first():
    from actsparse.codegen.lowering.quant import unpack_nibbles

    np.testing.assert_array_equal(unpack_nibbles(np.array([[0x21, 0xF3]], np.uint8)), [[1, 2, 3, 15]])


def test_non_int8_qdq_weights_are_not_matched():
    """A DequantizeLinear with a nonzero weight zero point (asymmetric int8) stays with TVM."""
    from onnx import helper, numpy_helper

    import onnx_ir as ir

    from actsparse.codegen.lowering.quant import select_quant_kernels

    q = np.ones((4, 3), np.int8)
    graph = helper.make_graph(
        [helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["w"], axis=1),
         helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", 1, [1, 4])], [helper.make_tensor_value_info("y", 1, [1, 3])],
        [numpy_helper.from_array(q, "wq"), numpy_helper.from_array(np.ones(3, np.float32), "ws"),
         numpy_helper.from_array(np.array([0, 1, 0], np.int8), "wz")])
    model = ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))
    assert select_quant_kernels(model) == []
    assert [n.op_type for n in model.graph] == ["DequantizeLinear", "MatMul"]
