"""Device-side runtime: load a compiled artifact and run it.

Imports only the standard library, numpy, `tvm_ffi` and `safetensors`; never torch, onnx
or the TVM compiler (`import tvm`), so a device needs only `apache-tvm-ffi`, numpy,
safetensors and a `libtvm_runtime.so` (bundled in the artifact or from apache-tvm).

    model = actsparse.runtime.load("model.actsparse")      # directory or .tar
    outputs = model.run(x)                                  # {output name: np.ndarray}
"""

from __future__ import annotations

from actsparse.errors import ActsparseError

__all__ = ["load", "CompiledModel", "ActsparseError", "FORMAT_VERSION"]


def __getattr__(name: str):
    # Lazy: `import actsparse` imports runtime.threads, which must not pull in numpy and the loader.
    if name in ("load", "CompiledModel"):
        from actsparse.runtime import model

        return getattr(model, name)
    if name == "FORMAT_VERSION":
        from actsparse.runtime.artifact import FORMAT_VERSION

        return FORMAT_VERSION
    raise AttributeError(f"module 'actsparse.runtime' has no attribute {name!r}")
