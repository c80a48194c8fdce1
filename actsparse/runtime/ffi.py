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


# ---------------------------------------------------------------- CUDA
#
# A cuda artifact compiled on a machine without a GPU holds its kernels as CUDA C source
# (TVM 0.27 compiles device code at build time only when its CUDA runtime is loaded, which
# needs the NVIDIA driver). So the compiler also links the kernels compiled ahead of time
# by nvcc (a fatbin per source, keyed by the source's sha256) into the library as the symbol
# below, and the runtime answers TVM's request to compile a source with that fatbin: the
# device needs neither nvcc nor NVRTC nor `import tvm`.

DEVICE_CODE_SYMBOL = "actsparse_cuda_device_code"
DEVICE_CODE_MAGIC = b"ACTSPARSE-CUDA-1\n"
CUDA_RUNTIME_LIBRARY = "libtvm_runtime_cuda.so"
_CUDA_PROBE = "device_api.cuda"
KDL_CUDA = 2


def pack_device_code(binaries: dict[str, bytes], arch: str) -> bytes:
    """{sha256 of a CUDA source: its compiled fatbin} -> one blob (magic, JSON index line, data)."""
    import json

    index, offset = [], 0
    for digest, data in binaries.items():
        index.append({"source_sha256": digest, "offset": offset, "size": len(data), "arch": arch})
        offset += len(data)
    return DEVICE_CODE_MAGIC + json.dumps(index).encode() + b"\n" + b"".join(binaries.values())


def unpack_device_code(blob: bytes) -> dict[str, bytes]:
    """The inverse of `pack_device_code`; ActsparseError if the blob is not one."""
    import json

    if not blob.startswith(DEVICE_CODE_MAGIC) or b"\n" not in blob[len(DEVICE_CODE_MAGIC):]:
        raise ActsparseError("the compiled model's embedded CUDA code is damaged (bad header)")
    header, _, data = blob[len(DEVICE_CODE_MAGIC):].partition(b"\n")
    try:
        index = json.loads(header)
        return {e["source_sha256"]: data[e["offset"]: e["offset"] + e["size"]] for e in index}
    except (ValueError, KeyError, TypeError):
        raise ActsparseError("the compiled model's embedded CUDA code is damaged (bad index)") from None


def embedded_device_code(library: Path) -> dict[str, bytes]:
    """The fatbins linked into a compiled model (empty if it has none)."""
    handle = ctypes.CDLL(str(library))  # the TVM runtime is loaded RTLD_GLOBAL already
    try:
        start = ctypes.c_char.in_dll(handle, DEVICE_CODE_SYMBOL)
        size = ctypes.c_uint64.in_dll(handle, DEVICE_CODE_SYMBOL + "_size").value
    except ValueError:
        return {}
    return unpack_device_code(ctypes.string_at(ctypes.addressof(start), size))


def cuda_devices() -> list[tuple[str, str]]:
    """(name, arch such as "sm_90") of every GPU the NVIDIA driver sees, through libcuda alone.

    Raises ActsparseError when there is no driver or no GPU, with the reason.
    """
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        raise ActsparseError("no NVIDIA driver on this machine (libcuda.so.1 not found)") from None
    if cuda.cuInit(0) != 0:
        raise ActsparseError("the NVIDIA driver failed to initialize (cuInit); is a GPU visible to this process?")
    count = ctypes.c_int(0)
    if cuda.cuDeviceGetCount(ctypes.byref(count)) != 0 or count.value == 0:
        raise ActsparseError("the NVIDIA driver sees no GPU (check CUDA_VISIBLE_DEVICES)")
    devices = []
    for ordinal in range(count.value):
        device, major, minor = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
        name = ctypes.create_string_buffer(256)
        cuda.cuDeviceGet(ctypes.byref(device), ordinal)
        cuda.cuDeviceGetName(name, 256, device)
        cuda.cuDeviceGetAttribute(ctypes.byref(major), 75, device)  # COMPUTE_CAPABILITY_MAJOR
        cuda.cuDeviceGetAttribute(ctypes.byref(minor), 76, device)  # COMPUTE_CAPABILITY_MINOR
        devices.append((name.value.decode(errors="replace"), f"sm_{major.value}{minor.value}"))
    return devices


def arch_number(arch: str) -> int:
    """"sm_90" -> 90 (ActsparseError for anything else)."""
    if not isinstance(arch, str) or not arch.startswith("sm_") or not arch[3:].isdigit():
        raise ActsparseError(f"not a CUDA arch: {arch!r} (expected sm_XX, e.g. sm_80)")
    return int(arch[3:])


def check_cuda_device(arch: str, device_id: int = 0) -> str:
    """Refuse, with the reason, to run code built for `arch` on this machine's GPU `device_id`.

    The embedded fatbin holds machine code for `arch` and PTX for it, which the driver
    compiles for newer GPUs; an older GPU cannot run it. Returns the GPU's name.
    """
    try:
        devices = cuda_devices()
    except ActsparseError as exc:
        raise ActsparseError(f"artifact targets 'cuda' ({arch or 'arch not recorded'}), but it cannot run here: "
                             f"{exc}") from None
    if device_id >= len(devices):
        raise ActsparseError(f"no CUDA device {device_id}: this machine has {len(devices)}")
    name, have = devices[device_id]
    if arch_number(have) < arch_number(arch):
        raise ActsparseError(f"the artifact was compiled for {arch}, but GPU {device_id} ({name}) is {have}: "
                             f"recompile with --target cuda:{have}")
    return name


def ensure_cuda_runtime(bundled: Path | None = None) -> None:
    """Load TVM's CUDA runtime plugin (libtvm_runtime_cuda.so) once, after `ensure_tvm_runtime`.

    It sits next to libtvm_runtime.so in the apache-tvm wheel (tvm/lib/); artifacts do not
    bundle it (it links the CUDA runtime library, libcudart).
    """
    tvm_ffi = import_tvm_ffi()
    with _lock:
        if tvm_ffi.get_global_func(_CUDA_PROBE, allow_missing=True) is not None:
            return
        candidates = [p.parent / CUDA_RUNTIME_LIBRARY for p in (bundled, _runtime_from_env(), _runtime_from_package())
                      if p is not None]
        path = next((c for c in candidates if c.is_file()), None)
        if path is None:
            raise ActsparseError(f"cannot find TVM's CUDA runtime {CUDA_RUNTIME_LIBRARY}: install apache-tvm "
                                 f"(it ships in tvm/lib/) or set {RUNTIME_ENV_VAR} to a libtvm_runtime.so beside it")
        try:
            _loaded_runtimes.append(ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL))
        except OSError as exc:
            raise ActsparseError(f"cannot load TVM's CUDA runtime {path}: {exc}") from None
        if tvm_ffi.get_global_func(_CUDA_PROBE, allow_missing=True) is None:
            raise ActsparseError(f"{path} loaded but registers no CUDA device API")


def serve_device_code(binaries: dict[str, bytes]) -> None:
    """Answer TVM's "compile this CUDA source" callback with the precompiled fatbins.

    A source whose sha256 is not among them goes to the callback registered before
    (e.g. `tvm.support.nvcc`'s, when the full TVM is imported), or fails with a clear error.
    """
    import hashlib

    tvm_ffi = import_tvm_ffi()
    global _serving
    with _lock:
        _served_device_code.update(binaries)
        if _serving:
            return
        previous = tvm_ffi.get_global_func("tvm_callback_cuda_compile", allow_missing=True)

        def compile_from_embedded(source, *rest):
            digest = hashlib.sha256(str(source).encode()).hexdigest()
            if digest in _served_device_code:
                return _served_device_code[digest]
            if previous is not None:
                return previous(source, *rest)
            raise RuntimeError("this compiled model carries CUDA source without precompiled device code, and "
                               "no CUDA compiler is registered (import tvm with nvcc or NVRTC available)")

        tvm_ffi.register_global_func("tvm_callback_cuda_compile", compile_from_embedded, override=True)
        _serving = True


_served_device_code: dict[str, bytes] = {}  # sha256 of a CUDA source -> its fatbin, for this process
_serving = False


class CudaTensors:
    """Host <-> device copies for a CUDA model, through the TVM runtime's tensor functions."""

    def __init__(self, device_id: int = 0):
        tvm_ffi = import_tvm_ffi()
        self.tvm_ffi = tvm_ffi
        self.device = tvm_ffi.device("cuda", device_id)
        self._alloc = tvm_ffi.get_global_func("runtime.TVMTensorAllocWithScope")
        self._copy = tvm_ffi.get_global_func("runtime.TVMTensorCopyFromTo")

    def to_device(self, array):
        """A device copy of a host array (numpy, 64-byte aligned)."""
        host = self.tvm_ffi.from_dlpack(array)
        out = self._alloc(self.tvm_ffi.Shape(tuple(host.shape)), host.dtype, self.device, None)
        self._copy(host, out)
        return out

    def to_host(self, tensor):
        """A numpy copy of a device tensor."""
        import numpy as np

        out = np.empty(tuple(tensor.shape), dtype=str(tensor.dtype))
        self._copy(tensor, self.tvm_ffi.from_dlpack(out))
        return out

    def copy(self, tensor):
        """A compact, TVM-allocated (aligned) device copy of a device tensor."""
        out = self._alloc(self.tvm_ffi.Shape(tuple(tensor.shape)), tensor.dtype, self.device, None)
        self._copy(tensor, out)
        return out
