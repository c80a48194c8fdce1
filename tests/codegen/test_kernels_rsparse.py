"""The batch-1 R-Sparse kernel against its numpy reference: both row schedules, odd sizes and ranks,
everything kept, nothing kept, in between."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("tvm")

from actsparse.codegen.kernels import reference as ref  # noqa: E402
from actsparse.codegen.kernels.cpu import build_kernel  # noqa: E402
from actsparse.codegen.kernels.cpu.rsparse import pack_rank_sparse, rank_slice, rank_sparse_matmul  # noqa: E402
from actsparse.codegen.kernels.cpu.schedule import PLAIN_ROWS, X86_ROWS  # noqa: E402
from actsparse.codegen.targets import resolve_target  # noqa: E402

ATOL = 2e-4
RTOL = 1e-4
# (k, n, rank): n not a multiple of the vector block; ranks leaving tasks without rows of B (3),
# filling whole slices (64 = 4 tasks x 16 lanes) and ending inside a slice (21, 70).
SHAPES = [(45, 77, 3), (64, 130, 64), (100, 36, 21), (37, 50, 70)]
KEPT = [0.0, 0.3, 1.0]


@pytest.fixture(scope="module", params=[X86_ROWS, PLAIN_ROWS], ids=["x86_rows", "plain_rows"])
def kernels(request):
    target = resolve_target("host")
    return {shape: build_kernel(rank_sparse_matmul(*shape, schedule=request.param), target) for shape in SHAPES}


def _case(k, n, rank, kept, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, k)).astype(np.float32)
    w = rng.standard_normal((k, n)).astype(np.float32)
    a = rng.standard_normal((k, rank)).astype(np.float32)
    b = rng.standard_normal((rank, n)).astype(np.float32)
    scale = rng.uniform(0.2, 3.0, k).astype(np.float32)
    scores = np.sort((np.abs(x) * scale).ravel())
    if kept >= 1:
        t = np.float32(-1)
    elif kept <= 0:
        t = np.float32(scores[-1] * 2)
    else:  # midway between two scores: float32 rounding cannot move a channel across
        cut = int((1 - kept) * k)
        t = np.float32((scores[cut - 1] + scores[cut]) / 2)
    return x, t, scale, w, a, b


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("kept", KEPT)
def test_rank_sparse_matmul_matches_numpy(kernels, shape, kept):
    k, n, rank = shape
    x, t, scale, w, a, b = _case(k, n, rank, kept, seed=k * n + rank)
    a_padded, wb = pack_rank_sparse(w, a, b)
    y = kernels[shape](x, np.array([t], np.float32), scale, a_padded, wb)
    expected = ref.rank_sparse_matmul_reference(x, t, scale, w, a, b)
    np.testing.assert_allclose(y, expected, atol=ATOL * np.abs(expected).max(), rtol=RTOL)
    if kept >= 1:  # everything kept: the plain product, the low-rank part adds nothing
        np.testing.assert_allclose(y, ref.dense_matmul_reference(x, w), atol=ATOL * np.abs(expected).max(), rtol=RTOL)
    if kept <= 0:  # nothing kept: x @ A @ B alone
        np.testing.assert_allclose(y, ((x.astype(np.float64) @ a) @ b).astype(np.float32),
                                   atol=ATOL * np.abs(expected).max(), rtol=RTOL)


def test_pack_splits_a_into_task_panels_and_stacks_b_under_w():
    w, b = np.ones((5, 7), np.float32), np.full((10, 7), 3, np.float32)
    a = np.arange(50, dtype=np.float32).reshape(5, 10)
    panels, wb = pack_rank_sparse(w, a, b, lanes=2, chunks=4)
    assert rank_slice(10, 2, 4) == 4 and panels.shape == (4, 5, 4)
    np.testing.assert_array_equal(panels[0], a[:, 0:4])
    np.testing.assert_array_equal(panels[1], a[:, 4:8])
    np.testing.assert_array_equal(panels[2][:, :2], a[:, 8:10])
    assert not panels[2][:, 2:].any() and not panels[3].any()
    np.testing.assert_array_equal(wb, np.concatenate([w, b]))


def test_rank_zero_is_refused():
    with pytest.raises(ValueError, match="rank must be >= 1"):
        rank_sparse_matmul(8, 8, 0)
