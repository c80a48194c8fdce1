"""Device-side runtime: load a compiled artifact and run it.

Imports only the standard library, numpy, `tvm_ffi` and `safetensors`; never torch, onnx
or the TVM compiler (`import tvm`), so a device needs only `apache-tvm-ffi`, numpy,
safetensors and a `libtvm_runtime.so` (bundled in the artifact or from apache-tvm).

    model = actsparse.runtime.load("model.actsparse")      # directory or .tar
    outputs = model.run(x)                                  # {output name: np.ndarray}
"""

from __future__ import annotations

from actsparse.errors import ActsparseError
from actsparse.runtime.artifact import FORMAT_VERSION
from actsparse.runtime.model import CompiledModel, load

__all__ = ["load", "CompiledModel", "ActsparseError", "FORMAT_VERSION"]
