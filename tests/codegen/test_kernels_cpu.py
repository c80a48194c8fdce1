"""Every CPU TIR kernel against its numpy reference: odd sizes, sparsity 0 %, partial, 100 %.

Kernels are built once per module (compiling dominates the run time).
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tvm")

from actsparse.codegen.kernels import reference as ref  # noqa: E402
from actsparse.codegen.kernels.cpu import (  # noqa: E402
    aligned_array,
    build_kernel,
    dense_matmul,
    ffn_gate_sparse,
    ffn_indexed,
    ffn_input_sparse,
    pack_dense,
    pack_ffn_gate_sparse,
    pack_ffn_indexed,
    pack_ffn_input_sparse,
    sparse_matmul,
)
from actsparse.codegen.kernels.cpu.schedule import PLAIN_ROWS, X86_ROWS  # noqa: E402
from actsparse.codegen.targets import resolve_target  # noqa: E402
from actsparse.errors import ActsparseError  # noqa: E402

ATOL = 2e-4
RTOL = 1e-4


@pytest.fixture(scope="module")
def target():
    return resolve_target("host")


def _rand(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


def _threshold_for(values: np.ndarray, sparsity: float) -> np.float32:
    """A threshold on |values| leaving about ``1 - sparsity`` of them active (all at 0, none at 1)."""
    if sparsity <= 0:
        return np.float32(-1.0)
    if sparsity >= 1:
        return np.float32(np.abs(values).max() + 1)
    # Midway between two magnitudes, so float32 rounding cannot flip a channel at the edge.
    ordered = np.sort(np.abs(values).ravel())
    cut = min(int(sparsity * ordered.size), ordered.size - 1)
    return np.float32((ordered[cut - 1] + ordered[cut]) / 2) if cut > 0 else np.float32(ordered[0] / 2)


# (m, k, n): M=1 GEMV, small batches, an M>=16 tiled case; n not a multiple of the vector block.
DENSE_SHAPES = [(1, 37, 45), (1, 64, 96), (3, 33, 70), (8, 20, 100), (19, 50, 33)]


# With the x86 schedule the panel stream is prefetched ahead (past the end of these small
# panels: the address is clamped to the buffer); the plain schedule has no prefetch.
@pytest.fixture(scope="module", params=[X86_ROWS, PLAIN_ROWS], ids=["x86_rows", "plain_rows"])
def dense_kernels(target, request):
    return {shape: build_kernel(dense_matmul(*shape, schedule=request.param), target) for shape in DENSE_SHAPES}


@pytest.mark.parametrize("shape", DENSE_SHAPES)
def test_dense_matmul_matches_numpy(dense_kernels, shape):
    m, k, n = shape
    rng = np.random.default_rng(sum(shape))
    x, w = _rand(rng, m, k), _rand(rng, k, n)
    y = dense_kernels[shape](x, pack_dense(w))
    np.testing.assert_allclose(y, ref.dense_matmul_reference(x, w), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("shape", [(1, 37, 64), (32, 50, 96), (7, 16, 32)])
def test_dense_matmul_reads_an_unpacked_weight_through_strides(target, shape):
    """The prompt's multi-row kernel over a row-major W [k, n] (the sparse kernels' layout)."""
    m, k, n = shape
    rng = np.random.default_rng(sum(shape))
    x, w = _rand(rng, m, k), _rand(rng, k, n)
    y = build_kernel(dense_matmul(m, k, n, layout="kn"), target)(x, w)
    np.testing.assert_allclose(y, ref.dense_matmul_reference(x, w), atol=ATOL, rtol=RTOL)


def test_dense_matmul_reads_transposed_interleaved_rows(target):
    """W^T rows `row_stride` apart from `offset`: the gate (or up) half of a [n, 2, k] buffer."""
    m, k, n = 5, 24, 64
    rng = np.random.default_rng(3)
    x, both = _rand(rng, m, k), _rand(rng, n, 2, k)
    for half in (0, 1):
        kernel = build_kernel(dense_matmul(m, k, n, layout="nk", row_stride=2 * k, offset=half * k), target)
        y = kernel(x, both.reshape(-1))
        np.testing.assert_allclose(y, ref.dense_matmul_reference(x, both[:, half].T.copy()), atol=ATOL, rtol=RTOL)


def test_dense_matmul_unpacked_needs_whole_blocks():
    with pytest.raises(ValueError, match="multiple"):
        dense_matmul(4, 8, 40, layout="kn")


def test_pack_dense_zero_pads_columns():
    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    packed = pack_dense(w, block=4)
    assert packed.shape == (1, 2, 4)
    np.testing.assert_array_equal(packed[0, :, :3], w)
    np.testing.assert_array_equal(packed[0, :, 3], 0)


SPARSE_SHAPES = [(1, 45, 77), (1, 64, 130), (4, 33, 50), (7, 40, 36)]
SPARSITIES = [0.0, 0.5, 0.9, 1.0]


# Both batch-1 row schedules (x86: per-task lists, 8 rows per step, L2 prefetch; elsewhere: one
# serial list, 16 rows per step), whatever the host, so that both code paths are checked here.
@pytest.fixture(scope="module", params=[X86_ROWS, PLAIN_ROWS], ids=["x86_rows", "plain_rows"])
def sparse_kernels(target, request):
    return {
        (mode, shape): build_kernel(sparse_matmul(*shape, mode=mode, schedule=request.param), target)
        for mode in ("threshold", "scaled", "nonzero")
        for shape in SPARSE_SHAPES
    }


@pytest.mark.parametrize("shape", SPARSE_SHAPES)
@pytest.mark.parametrize("sparsity", SPARSITIES)
@pytest.mark.parametrize("mode", ["threshold", "scaled"])
def test_sparse_matmul_threshold_matches_numpy(sparse_kernels, mode, shape, sparsity):
    m, k, n = shape
    rng = np.random.default_rng(k * n)
    x, w = _rand(rng, m, k), _rand(rng, k, n)
    scale = rng.uniform(0.2, 3.0, k).astype(np.float32)
    magnitude = np.abs(x) * (scale if mode == "scaled" else 1)
    t = _threshold_for(magnitude, sparsity)
    args = (x, np.array([t], np.float32)) + ((scale,) if mode == "scaled" else ()) + (w,)
    y = sparse_kernels[(mode, shape)](*args)
    expected = ref.sparse_matmul_reference(x, w, mode, t, scale)
    np.testing.assert_allclose(y, expected, atol=ATOL, rtol=RTOL)
    if sparsity >= 1:
        assert not y.any()


@pytest.mark.parametrize("shape", SPARSE_SHAPES)
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_sparse_matmul_nonzero_matches_numpy(sparse_kernels, shape, sparsity):
    m, k, n = shape
    rng = np.random.default_rng(k + n)
    x, w = _rand(rng, m, k), _rand(rng, k, n)
    x[rng.random((m, k)) < sparsity] = 0
    y = sparse_kernels[("nonzero", shape)](x, w)
    np.testing.assert_allclose(y, ref.sparse_matmul_reference(x, w, "nonzero"), atol=ATOL, rtol=RTOL)


def test_sparse_matmul_rejects_unknown_mode():
    with pytest.raises(ValueError, match="mode"):
        sparse_matmul(1, 8, 8, mode="topk")


FFN_SHAPES = [(37, 53), (64, 100)]


def _ffn_weights(d, f, seed):
    rng = np.random.default_rng(seed)
    return _rand(rng, 1, d), _rand(rng, d, f, scale=d**-0.5), _rand(rng, d, f, scale=d**-0.5), _rand(rng, f, d, scale=f**-0.5)


@pytest.fixture(scope="module", params=[X86_ROWS, PLAIN_ROWS], ids=["x86_rows", "plain_rows"])
def ffn_kernels(target, request):
    kernels, schedule = {}, request.param
    for d, f in FFN_SHAPES:
        for act in ("silu", "relu"):
            kernels[("input", d, f, act)] = build_kernel(ffn_input_sparse(d, f, act, schedule=schedule), target)
            kernels[("gate", d, f, act)] = build_kernel(ffn_gate_sparse(d, f, act, schedule=schedule), target)
            kernels[("indexed", d, f, act)] = build_kernel(ffn_indexed(d, f, act, schedule=schedule), target)
    return kernels


@pytest.mark.parametrize("d,f", FFN_SHAPES)
@pytest.mark.parametrize("act", ["silu", "relu"])
@pytest.mark.parametrize("sparsity", SPARSITIES)
def test_ffn_input_sparse_matches_numpy(ffn_kernels, d, f, act, sparsity):
    x, wg, wu, wd = _ffn_weights(d, f, d + f)
    t_in = _threshold_for(x, sparsity)
    xs = np.where(np.abs(x) > t_in, x, 0)
    hidden = ref.ffn_reference(xs, wg, wu, wd, act, return_hidden=True)[1]
    t_down = _threshold_for(hidden, sparsity)
    y = ffn_kernels[("input", d, f, act)](x, np.array([t_in]), np.array([t_down]), *pack_ffn_input_sparse(wg, wu, wd))
    expected = ref.ffn_input_sparse_reference(x, t_in, t_down, wg, wu, wd, act)
    np.testing.assert_allclose(y, expected, atol=ATOL, rtol=RTOL)
    if sparsity == 0:
        np.testing.assert_allclose(y, ref.ffn_reference(x, wg, wu, wd, act), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("d,f", FFN_SHAPES)
@pytest.mark.parametrize("act", ["silu", "relu"])
@pytest.mark.parametrize("threshold", [-1.0, 0.0, 0.2, 1e9])
def test_ffn_gate_sparse_matches_numpy(ffn_kernels, d, f, act, threshold):
    x, wg, wu, wd = _ffn_weights(d, f, 2 * d + f)
    t = np.float32(threshold)
    y = ffn_kernels[("gate", d, f, act)](x, np.array([t]), *pack_ffn_gate_sparse(wg, wu, wd))
    np.testing.assert_allclose(y, ref.ffn_gate_sparse_reference(x, t, wg, wu, wd, act), atol=ATOL, rtol=RTOL)
    if act == "relu" and threshold <= 0:  # relu(gate) > 0 drops only exact zeros: the dense result
        np.testing.assert_allclose(y, ref.ffn_reference(x, wg, wu, wd, act), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("d,f", FFN_SHAPES)
@pytest.mark.parametrize("act", ["silu", "relu"])
@pytest.mark.parametrize("fraction", [0.0, 0.05, 0.5, 1.0])
def test_ffn_indexed_matches_numpy(ffn_kernels, d, f, act, fraction):
    x, wg, wu, wd = _ffn_weights(d, f, 3 * d + f)
    rng = np.random.default_rng(f)
    nnz = int(round(f * fraction))
    idx = np.full(f, -7, np.int32)  # entries past nnz must be ignored
    idx[:nnz] = rng.permutation(f)[:nnz]
    y = ffn_kernels[("indexed", d, f, act)](x, idx, np.array([nnz], np.int32), *pack_ffn_indexed(wg, wu, wd))
    np.testing.assert_allclose(y, ref.ffn_indexed_reference(x, idx, nnz, wg, wu, wd, act), atol=ATOL, rtol=RTOL)


def test_build_kernel_checks_input_shapes(dense_kernels):
    kernel = dense_kernels[DENSE_SHAPES[0]]
    with pytest.raises(ActsparseError, match="expected float32"):
        kernel(np.zeros((1, 5), np.float32), np.zeros((1, 5, 32), np.float32))


def test_aligned_array_is_aligned_copy():
    source = np.arange(10, dtype=np.float32)[1:]
    out = aligned_array(source)
    assert out.ctypes.data % 64 == 0
    np.testing.assert_array_equal(out, source)


@pytest.mark.parametrize("lanes", [4, 8, 16])
def test_default_row_tile_stays_on_the_stack(lanes):
    """An accumulator tile of 1024 bytes or more becomes a heap workspace in TVM, which LLVM
    cannot keep in registers (the 8 x 32 tile ran 2.5x slower than 6 x 32 at M=128)."""
    from actsparse.codegen.kernels.cpu.dense import STACK_ALLOCA_LIMIT, default_row_tile

    rows = default_row_tile(128, lanes)
    assert rows >= 4
    assert rows * 2 * lanes * 4 < STACK_ALLOCA_LIMIT
    assert default_row_tile(3, lanes) == 3


@pytest.mark.parametrize("d,f,act", [(64, 176, "silu"), (40, 70, "silu"), (33, 50, "relu")])
@pytest.mark.parametrize("residual", [False, True])
def test_ffn_dense_matches_numpy(d, f, act, residual):
    from actsparse.codegen.kernels.cpu.ffn import ffn_dense, pack_ffn_dense

    rng = np.random.default_rng(d + f)
    wg, wu, wd = (rng.standard_normal(shape).astype(np.float32) * 0.2 for shape in ((d, f), (d, f), (f, d)))
    x = rng.standard_normal((1, d)).astype(np.float32)
    kernel = build_kernel(ffn_dense(d, f, act, residual=residual), resolve_target("host"))
    expected = ref.ffn_reference(x, wg, wu, wd, act) + (x if residual else 0)
    np.testing.assert_allclose(kernel(x, *pack_ffn_dense(wg, wu, wd)), expected, atol=1e-4, rtol=1e-4)


def test_pack_ffn_dense_interleaves_gate_and_up_per_panel():
    from actsparse.codegen.kernels.cpu.ffn import pack_ffn_dense

    d, f, lanes = 2, 6, 4
    wg = np.arange(d * f, dtype=np.float32).reshape(d, f)
    wgu, wd = pack_ffn_dense(wg, -wg, np.ones((f, d), np.float32), lanes=lanes)
    assert wgu.shape == (2, d, 8) and wd.shape == (1, f, 8)
    np.testing.assert_array_equal(wgu[0, :, :4], wg[:, :4])
    np.testing.assert_array_equal(wgu[0, :, 4:], -wg[:, :4])
    np.testing.assert_array_equal(wgu[1, :, :2], wg[:, 4:])
    assert not wgu[1, :, 2:4].any() and not wgu[1, :, 6:].any()  # padded neurons: zero gate and up


def _exp_kernel():
    """A vectorized elementwise exp built from fastmath.exp_f32."""
    from tvm.script import tirx as T

    from actsparse.codegen.kernels.cpu.fastmath import exp_f32

    @T.prim_func
    def exp_kernel(x: T.Buffer((4096,), "float32"), y: T.Buffer((4096,), "float32")):
        T.func_attr({"tir.noalias": True})
        for i0 in range(256):
            for i in T.vectorized(16):
                y[i0 * 16 + i] = exp_f32(x[i0 * 16 + i])

    return exp_kernel


def test_vectorizable_exp_matches_numpy():
    x = np.concatenate([np.linspace(-100, 100, 4000), [0.0, 1.0, -1.0, 88.0, -87.0, 1e-8, -1e-8] + [2.5] * 89])
    y = build_kernel(_exp_kernel(), resolve_target("host"))(x.astype(np.float32))
    exact = np.exp(x.astype(np.float32).astype(np.float64))
    in_range = (x > -87.3) & (x < 88.3)
    assert np.max(np.abs(y[in_range] - exact[in_range]) / exact[in_range]) < 3e-7
    assert np.all(y[x <= -88] < 1e-37) and np.all(np.isfinite(y)) and np.all(y >= 0)
