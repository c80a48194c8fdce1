"""actsparse: a compiler for activation-sparse, quantized neural-network inference.

The public API is re-exported lazily so that `import actsparse` stays cheap and the
device-side runtime (`actsparse.runtime`) never pulls in torch, onnx or the TVM compiler.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["optimize", "compile", "load", "ActsparseError"]

from actsparse.errors import ActsparseError
from actsparse.runtime.threads import configure_tvm_threads

# Before any TVM thread pool exists (see actsparse/threads.py: TVM's default uses half the cores on x86).
configure_tvm_threads()


def __getattr__(name: str):
    if name in ("optimize", "compile"):
        from actsparse import api

        return getattr(api, name)
    if name == "load":
        from actsparse.runtime import load

        return load
    raise AttributeError(f"module 'actsparse' has no attribute {name!r}")
