"""The per-target kernel schedule: which targets get which, and what it puts in the kernels."""

import pytest

pytest.importorskip("tvm")

from actsparse.codegen.kernels.cpu import dense_matmul  # noqa: E402
from actsparse.codegen.kernels.cpu.ffn import ffn_dense  # noqa: E402
from actsparse.codegen.kernels.cpu.schedule import (PLAIN_ROWS, X86_ROWS, batch1_row_schedule,  # noqa: E402
                                                    current_row_schedule, row_schedule_for)
from actsparse.codegen.targets import resolve_target  # noqa: E402


def _prefetches(prim_func) -> int:
    return prim_func.script().count("llvm.prefetch")


def test_x86_targets_get_the_x86_schedule_and_others_the_plain_one():
    assert row_schedule_for(resolve_target("x86")) == X86_ROWS
    assert row_schedule_for(resolve_target("rpi4")) == PLAIN_ROWS
    assert row_schedule_for(None) == PLAIN_ROWS


def test_only_the_x86_schedule_prefetches_the_dense_streams():
    assert X86_ROWS.stream_prefetch_bytes > 0 and PLAIN_ROWS.stream_prefetch_bytes == 0
    with batch1_row_schedule(X86_ROWS):
        assert _prefetches(dense_matmul(1, 64, 96)) == 1
        assert _prefetches(dense_matmul(8, 64, 96)) == 0  # M > 1: compute-bound, no prefetch
        assert _prefetches(ffn_dense(64, 96)) == 2  # gate/up panels, then down panels
    with batch1_row_schedule(PLAIN_ROWS):
        assert _prefetches(dense_matmul(1, 64, 96)) == 0
        assert _prefetches(ffn_dense(64, 96)) == 0


def test_the_schedule_is_restored_after_the_block():
    before = current_row_schedule()
    with pytest.raises(RuntimeError):
        with batch1_row_schedule(PLAIN_ROWS):
            raise RuntimeError
    assert current_row_schedule() is before


def test_read_probe_sums_every_element_once():
    import numpy as np

    from actsparse.codegen.kernels.cpu.build import build_kernel
    from actsparse.codegen.kernels.cpu.probe import read_sum

    size, tasks = 3 * 2 * 64, 2
    a = np.random.default_rng(0).standard_normal(size).astype(np.float32)
    partial = build_kernel(read_sum(size, tasks), resolve_target("host"))(a)
    expected = a.reshape(tasks, -1, 16).sum(axis=1)
    np.testing.assert_allclose(partial, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="multiple"):
        read_sum(100, 2)
