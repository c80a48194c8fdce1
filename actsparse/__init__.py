"""actsparse: a compiler for activation-sparse, quantized neural-network inference.

The public API is re-exported lazily so that `import actsparse` stays cheap and the
device-side runtime (`actsparse.runtime`) never pulls in torch, onnx or the TVM compiler.
`pip install actsparse` is that device side; the compiler's dependencies come with
`pip install "actsparse[compile]"`.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["optimize", "compile", "load", "ActsparseError"]

from actsparse.errors import ActsparseError
from actsparse.runtime.threads import configure_tvm_threads

# Before any TVM thread pool exists (see actsparse/runtime/threads.py: TVM's default uses half the cores on x86).
configure_tvm_threads()

# Installed by the `compile` extra; the base install (the device side) has none of them.
COMPILER_MODULES = frozenset({"onnx", "onnx_ir", "onnxscript", "onnxruntime", "tvm", "networkx", "yaml"})


def __getattr__(name: str):
    if name in ("optimize", "compile"):
        return getattr(_compiler_api(name), name)
    if name == "load":
        from actsparse.runtime import load

        return load
    raise AttributeError(f"module 'actsparse' has no attribute {name!r}")


def _compiler_api(name: str):
    """`actsparse.api`, or an error naming the extra to install where only the runtime is installed."""
    try:
        from actsparse import api
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in COMPILER_MODULES:
            raise
        raise ActsparseError(f"actsparse.{name} needs the compiler, which this install lacks (no module "
                             f"{exc.name!r}): pip install \"actsparse[compile]\"") from None
    return api
