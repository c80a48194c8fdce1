"""Build one TIR kernel into a callable for tests and benchmarks.

Kernels use destination-passing style (outputs are the last parameters), the
convention of Relax ``call_tir``. ``build_kernel`` wraps that for numpy: pass the
inputs, get the outputs back. Every array handed to a kernel is copied into
TVM-allocated memory, which is 64-byte aligned: the kernels assume aligned data,
and unaligned numpy memory passed through DLPack has segfaulted (measured on this project's x86 CI machines).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from actsparse.errors import ActsparseError

ALIGNMENT = 64


def _param_shapes(prim_func) -> list[tuple[tuple[int, ...], str]]:
    """(shape, dtype) of every buffer parameter, in order."""
    specs = []
    for param in prim_func.params:  # TVM 0.27: params are the buffers themselves
        specs.append((tuple(int(d) for d in param.shape), str(param.dtype)))
    return specs


def aligned_array(array: np.ndarray, alignment: int = ALIGNMENT) -> np.ndarray:
    """A C-contiguous copy of ``array`` whose data starts on an ``alignment``-byte boundary."""
    array = np.asarray(array)
    raw = np.empty(array.nbytes + alignment, dtype=np.uint8)
    start = (-raw.ctypes.data) % alignment
    out = raw[start : start + array.nbytes].view(array.dtype).reshape(array.shape)
    out[...] = array
    return out


@dataclass
class BuiltKernel:
    """A compiled kernel. Call it with the input arrays; it returns the output array(s).

    ``raw`` is the TVM function taking all buffers (inputs then outputs) as TVM
    tensors, for timing loops that must not pay numpy conversion.
    """

    raw: Any
    param_specs: list[tuple[tuple[int, ...], str]]
    num_outputs: int

    @property
    def input_specs(self) -> list[tuple[tuple[int, ...], str]]:
        return self.param_specs[: len(self.param_specs) - self.num_outputs]

    @property
    def output_specs(self) -> list[tuple[tuple[int, ...], str]]:
        return self.param_specs[len(self.param_specs) - self.num_outputs :]

    def __call__(self, *inputs: np.ndarray):
        import tvm

        if len(inputs) != len(self.input_specs):
            raise ActsparseError(f"kernel takes {len(self.input_specs)} inputs, got {len(inputs)}")
        args = []
        for pos, (array, (shape, dtype)) in enumerate(zip(inputs, self.input_specs)):
            array = np.asarray(array)
            if array.shape != shape or str(array.dtype) != dtype:
                raise ActsparseError(
                    f"kernel input {pos}: expected {dtype}{list(shape)}, got {array.dtype}{list(array.shape)}"
                )
            args.append(tvm.runtime.tensor(np.ascontiguousarray(array)))
        outputs = [tvm.runtime.tensor(np.zeros(shape, dtype)) for shape, dtype in self.output_specs]
        self.raw(*args, *outputs)
        results = [out.numpy() for out in outputs]
        return results[0] if self.num_outputs == 1 else tuple(results)


def build_kernel(prim_func, target, num_outputs: int = 1) -> BuiltKernel:
    """Compile a single PrimFunc for ``target`` (a ``tvm.target.Target`` or a target name)."""
    import tvm

    if isinstance(target, str):
        from actsparse.codegen.targets import resolve_target

        target = resolve_target(target)
    func = prim_func.with_attr("global_symbol", "kernel")
    executable = tvm.compile(tvm.IRModule({"kernel": func}), target)
    return BuiltKernel(executable["kernel"], _param_shapes(prim_func), num_outputs)
