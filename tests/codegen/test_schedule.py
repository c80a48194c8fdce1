"""The per-target kernel schedule: which targets get which, and what it puts in the kernels."""

import pytest

pytest.importorskip("tvm")

from actsparse.codegen.kernels.cpu import dense_matmul  # noqa: E402
from actsparse.codegen.kernels.cpu.ffn import ffn_dense  # noqa: E402
from actsparse.codegen.kernels.cpu.schedule import PLAIN_ROWS, X86_ROWS, row_schedule_for  # noqa: E402
from actsparse.codegen.targets import resolve_target  # noqa: E402


def _prefetches(prim_func) -> int:
    return prim_func.script().count("llvm.prefetch")


def test_x86_targets_get_the_x86_schedule_and_others_the_plain_one():
    assert row_schedule_for(resolve_target("x86")) == X86_ROWS
    assert row_schedule_for(resolve_target("rpi4")) == PLAIN_ROWS
    assert row_schedule_for(None) == PLAIN_ROWS


def test_only_the_x86_schedule_prefetches_the_dense_streams():
    assert X86_ROWS.stream_prefetch_bytes > 0 and PLAIN_ROWS.stream_prefetch_bytes == 0
    assert _prefetches(dense_matmul(1, 64, 96, schedule=X86_ROWS)) == 1
    assert _prefetches(dense_matmul(8, 64, 96, schedule=X86_ROWS)) == 0  # M > 1: compute-bound, no prefetch
    assert _prefetches(ffn_dense(64, 96, schedule=X86_ROWS)) == 2  # gate/up panels, then down panels
    assert _prefetches(dense_matmul(1, 64, 96, schedule=PLAIN_ROWS)) == 0
    assert _prefetches(ffn_dense(64, 96, schedule=PLAIN_ROWS)) == 0


@pytest.mark.parametrize("name,prefetches", [("x86", True), ("rpi4", False)])
def test_the_lowering_builds_its_kernels_with_the_targets_schedule(name, prefetches):
    import numpy as np
    import onnx_ir as ir
    from onnx import TensorProto, helper, numpy_helper

    from actsparse.codegen.lower import select_kernels, specialize_shapes, to_relax
    from actsparse.codegen.targets import describe_target

    w = numpy_helper.from_array(np.ones((64, 96), np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="linear")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 96])], [w])
    model = specialize_shapes(ir.serde.deserialize_model(helper.make_model(graph)), {})
    target = describe_target(resolve_target(name))
    select_kernels(model, target)
    mod, _ = to_relax(model, target)
    assert ("llvm.prefetch" in mod.script()) is prefetches


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
