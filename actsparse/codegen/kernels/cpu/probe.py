"""A read-bandwidth probe: the fastest plain read of an fp32 array we know how to write in TIR.

Benchmarks time it on the same bytes as a model's weights, next to the model, to say how close a
memory-bound kernel runs to what this machine can read (the numpy copy probe counts writes too
and its ratio to reading varies by machine). Each of ``tasks`` parallel tasks reads one
contiguous part as one stream, 64 floats a step into four vector accumulators, with the
target schedule's far prefetch (``schedule.stream_prefetch_macro``) - the stream shape of the
dense panel kernels.
"""

from __future__ import annotations

from tvm.script import tirx as T

from actsparse.codegen.kernels.cpu.schedule import X86_ROWS, RowSchedule, stream_prefetch_macro

STEP = 64  # floats per step: four 16-lane accumulators


def read_sum(size: int, tasks: int = 2, schedule: RowSchedule = X86_ROWS):
    """Signature: ``(a: f32[size], partial: f32[tasks, 16])``; partial[t, j] sums a[i] over task
    t's part for i = j mod 16 (size a multiple of tasks x 64)."""
    if size % (tasks * STEP):
        raise ValueError(f"size must be a multiple of {tasks * STEP}, got {size}")
    part = size // tasks
    prefetch_stream = stream_prefetch_macro(element_bytes=4, ahead_bytes=schedule.stream_prefetch_bytes)

    @T.prim_func
    def read_sum_kernel(a: T.Buffer((size,), "float32"), partial: T.Buffer((tasks, 16), "float32")):
        T.func_attr({"tir.noalias": True})
        for t in T.parallel(tasks):
            acc = T.alloc_buffer((4, 16), "float32")
            for u in T.unroll(4):
                for j in T.vectorized(16):
                    acc[u, j] = T.float32(0)
            for i in range(part // STEP):
                prefetch_stream(a, t * part + i * STEP)
                for u in T.unroll(4):
                    for j in T.vectorized(16):
                        acc[u, j] = acc[u, j] + a[t * part + i * STEP + u * 16 + j]
            for j in T.vectorized(16):
                partial[t, j] = acc[0, j] + acc[1, j] + acc[2, j] + acc[3, j]

    return read_sum_kernel
