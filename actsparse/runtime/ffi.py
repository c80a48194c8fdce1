"""Reach the TVM runtime through `tvm_ffi` alone, never `import tvm`.

`import tvm` pulls in the whole compiler (~300 MB, seconds to import). A Relax executable
needs only `libtvm_runtime.so` (a few MB) plus the `apache-tvm-ffi` package: load the
library RTLD_GLOBAL so its VM functions register themselves, then `tvm_ffi.load_module`
the exported executable.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import sys
import threading
from pathlib import Path

from actsparse.errors import ActsparseError

RUNTIME_ENV_VAR = "ACTSPARSE_TVM_RUNTIME"
RUNTIME_LIBRARY = "libtvm_runtime.so"
# A global function that libtvm_runtime.so registers; present once any TVM runtime is loaded
# (ours, or the one `import tvm` brought in).
_RUNTIME_PROBE = "vm.builtin.alloc_storage"

_lock = threading.Lock()
_loaded_runtimes: list[ctypes.CDLL] = []  # keeps the handles alive for the process


def import_tvm_ffi():
    """Import `tvm_ffi` without letting it import torch.

    tvm_ffi's `__init__` (and its Cython core) try `import torch` only to speed up DLPack
    exchange with torch tensors; importing torch costs seconds and hundreds of MB, which
    a device runtime must not pay. While tvm_ffi imports, `sys.modules["torch"] = None`
    makes that `import torch` fail fast with ImportError, which tvm_ffi handles; the
    entry is removed afterwards so the process can still import torch itself. If torch
    is already imported, nothing is blocked. Consequence: a process that imports this
    runtime before torch gets tvm_ffi without its torch fast path (torch tensors still
    cross through the standard `__dlpack__` protocol).
    """
    if "tvm_ffi" in sys.modules:
        return sys.modules["tvm_ffi"]
    with _lock:
        block = "torch" not in sys.modules
        if block:
            sys.modules["torch"] = None
        try:
            import tvm_ffi
        except ImportError as exc:
            raise ActsparseError(
                f"the actsparse runtime needs the package apache-tvm-ffi (pip install apache-tvm-ffi): {exc}"
            ) from None
        finally:
            if block and "torch" in sys.modules and sys.modules["torch"] is None:
                del sys.modules["torch"]
    return tvm_ffi


def ensure_tvm_runtime(bundled: Path | None = None) -> None:
    """Make the TVM runtime's functions available, loading `libtvm_runtime.so` once per process.

    Search order: the copy bundled in the artifact, then $ACTSPARSE_TVM_RUNTIME (an explicit
    choice beats a guess), then the one inside an installed apache-tvm package. If a TVM
    runtime is already loaded (an earlier artifact, or `import tvm`), it is reused: loading a
    second copy would register every runtime function twice.
    """
    tvm_ffi = import_tvm_ffi()
    with _lock:
        if tvm_ffi.get_global_func(_RUNTIME_PROBE, allow_missing=True) is not None:
            return
        path = bundled or _runtime_from_env() or _runtime_from_package()
        if path is None:
            raise ActsparseError(
                f"cannot find {RUNTIME_LIBRARY}: bundle it in the artifact (compile with the runtime bundled), "
                f"install apache-tvm, or set {RUNTIME_ENV_VAR} to its path"
            )
        try:
            _loaded_runtimes.append(ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL))
        except OSError as exc:
            raise ActsparseError(f"cannot load the TVM runtime {path}: {exc}") from None
        if tvm_ffi.get_global_func(_RUNTIME_PROBE, allow_missing=True) is None:
            raise ActsparseError(f"{path} loaded but is not a TVM runtime with the Relax VM")


def installed_runtime_library() -> Path | None:
    """`tvm/lib/libtvm_runtime.so` of an installed apache-tvm, found without importing tvm."""
    return _runtime_from_package()


def _runtime_from_env() -> Path | None:
    value = os.environ.get(RUNTIME_ENV_VAR)
    if not value:
        return None
    path = Path(value)
    if not path.is_file():
        raise ActsparseError(f"{RUNTIME_ENV_VAR}={value}: no such file")
    return path


def _runtime_from_package() -> Path | None:
    try:
        spec = importlib.util.find_spec("tvm")  # locates the package; does not run its __init__
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / "lib" / RUNTIME_LIBRARY
        if candidate.is_file():
            return candidate
    return None
