"""Load a compiled artifact and run it: numpy in, numpy out, no torch, onnx or `import tvm`."""

from __future__ import annotations

import copy
import hashlib
import lzma
import os
import tarfile
import tempfile
import threading
import zlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from actsparse.errors import ActsparseError
from actsparse.runtime import artifact
from actsparse.runtime import ffi
from actsparse.runtime.ffi import ensure_tvm_runtime, import_tvm_ffi

# TIR kernels assume 64-byte aligned buffers; unaligned memory passed through DLPack segfaulted.
ALIGNMENT = 64

# Arguments of the Relax VM's vm_initialization: (device type, device id, allocator) for the
# device and then for the host. 1 = kDLCPU, 2 = pooled allocator.
_CPU_VM_INIT = (1, 0, 2, 1, 0, 2)
_CUDA_VM_INIT = (ffi.KDL_CUDA, 0, 2, 1, 0, 2)  # device: GPU 0; host: CPU
_CPU_TARGET_KINDS = ("llvm", "c")


# A shared library cannot be unloaded once TVM holds its functions: each load of a private copy
# used to map one more (load -> run -> del cycles grew the process without bound). A library
# already loaded (same sha256) is reused instead; distinct libraries stay mapped for the process.
_LOADED_LIBRARIES: dict[str, object] = {}

# TVM gives every OS thread that calls a parallel kernel a thread pool of its own, which outlives
# the thread: 600 short-lived caller threads left 1,200 OS threads behind. Calls from threads
# other than the main thread therefore run on these long-lived workers (at most one per core).
_workers = None
_workers_lock = threading.Lock()


def _worker_pool():
    global _workers
    with _workers_lock:
        if _workers is None:
            from concurrent.futures import ThreadPoolExecutor

            _workers = ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="actsparse-vm")
        return _workers


def call_vm(function):
    """`function()` (a VM call) on this thread if it is the main thread, else on a worker."""
    if threading.current_thread() is threading.main_thread():
        return function()
    return _worker_pool().submit(function).result()


def load(path: str | os.PathLike, device: str | None = None, *, trusted_keys=None) -> CompiledModel:
    """Load an artifact (a directory or a `.tar` of one) for running on this machine.

    Before any shared library is loaded, every file's sha256 is checked against the
    manifest, the file set must match it exactly, the format version must be one this
    runtime knows, and the target's CPU architecture must be this machine's. A `.tar` is
    extracted into a private temp directory, which is removed before `load` returns (the
    loaded code and weights live in memory). Each problem raises one ActsparseError.

    `trusted_keys`: public keys (paths of `actsparse keygen` .pub files, or key objects); default
    $ACTSPARSE_TRUSTED_KEYS. When any is configured, the manifest must be signed by one of them
    (runtime/signing.py), checked before anything else is read or loaded.

    `device`: "cpu" or "cuda" (GPU 0); None takes the artifact's (cuda artifacts run on "cuda").
    A cuda artifact also needs an NVIDIA GPU of at least the compiled arch and TVM's CUDA runtime
    plugin (libtvm_runtime_cuda.so, in the apache-tvm wheel); its weights are copied to the GPU
    once here.

    Args:
        path: the artifact: a directory, or a `.tar` of one.
        device: "cpu", "cuda", or None for the artifact's own.
        trusted_keys: public keys a signature must come from (paths or key objects); None reads
            $ACTSPARSE_TRUSTED_KEYS; with none configured, unsigned artifacts load.

    Returns:
        A CompiledModel, or a LanguageModel (`generate()`) for a causal-LM artifact.

    Raises:
        ActsparseError: a missing or tampered artifact (a file's sha256, an extra or missing file),
            an unknown format version, another CPU architecture, a missing or untrusted signature,
            a device this artifact cannot run on, or no TVM runtime library.
    """
    from actsparse.runtime.signing import trusted_keys_from

    path = Path(path)
    if not path.exists():
        raise ActsparseError(f"{path}: no such artifact")
    trusted = trusted_keys_from(trusted_keys)
    workdir = Path(tempfile.mkdtemp(prefix="actsparse-artifact-"))  # mode 0700: private
    try:
        root = _artifact_root(path, workdir)
        manifest = artifact.read_manifest(root, trusted_keys=trusted)
        artifact.verify_files(root, manifest, deferred=(manifest["params"]["file"],))  # checked as read
        artifact.check_machine(manifest["target"])
        on_gpu = _check_device(manifest["target"], device) == "cuda"
        bundled = manifest.get("runtime_library")
        bundled_copy = _verified_private_copy(root, bundled, manifest, workdir) if bundled else None
        ensure_tvm_runtime(bundled_copy)
        library_sha256 = manifest["files"][manifest["library"]]
        module = None if on_gpu else _LOADED_LIBRARIES.get(library_sha256)
        if module is None:
            library = _verified_private_copy(root, manifest["library"], manifest, workdir)
            if on_gpu:
                ffi.ensure_cuda_runtime(bundled_copy)
                ffi.serve_device_code(ffi.embedded_device_code(library))  # before TVM asks to compile it
            module = _load_module(library)
            if not on_gpu:
                _LOADED_LIBRARIES[library_sha256] = module
        params_file = manifest["params"]["file"]
        params = _load_params(root / params_file, manifest["params"]["names"], manifest["files"][params_file])
        gpu = ffi.CudaTensors() if on_gpu else None
        if gpu is not None:
            params = [gpu.to_device(np.from_dlpack(p)) for p in params]
        if "lm" in manifest:  # a language model: generate() over a KV cache owned by the runtime
            from actsparse.runtime.generate import LanguageModel

            files = {rel: _verified_bytes(root, rel, manifest) for rel in manifest["files"] if rel.startswith("tokenizer/")}
            return LanguageModel(manifest, module, params, source=path, gpu=gpu, files=files)
        return CompiledModel(manifest, module, params, source=path, gpu=gpu)
    finally:
        artifact.remove_tree(workdir)


class CompiledModel:
    """A loaded artifact. `run()` takes numpy arrays and returns {output name: numpy array}.

    Thread safety: each thread that calls `run()` gets its own VM instance (created on its
    first call) over the shared executable and weights. A Relax VM keeps its registers and
    program counter in the instance: one VM shared by 8 threads without a lock failed at
    once ("run into invalid section", type mismatches). Measured on 2 cores, 8 threads x
    200 runs: with single-threaded kernels per-thread VMs gave 26 ms/run against 41 ms/run
    for one VM behind a lock (the lock serializes callers); with parallel TIR kernels both
    were within noise (~4.7 ms/run), so per-thread VMs never lost.
    """

    def __init__(self, manifest: dict, module, params: list, *, source: Path, gpu: ffi.CudaTensors | None = None):
        self._gpu = gpu  # None: runs on the CPU
        self._manifest = manifest
        self._module = module
        self._params = params  # tvm_ffi tensors over 64-byte-aligned numpy memory
        self._source = source
        self._input_specs = [_InputSpec(spec) for spec in manifest["inputs"]]
        self._input_names = [spec.name for spec in self._input_specs]
        self._output_specs = manifest["outputs"]
        self._local = threading.local()
        self._tvm_ffi = import_tvm_ffi()

    # ------------------------------------------------------------ description

    @property
    def manifest(self) -> dict:
        """A copy of the artifact's manifest."""
        return copy.deepcopy(self._manifest)

    @property
    def target(self) -> dict:
        """The target the artifact was compiled for (kind, mtriple, mcpu, machine, ...)."""
        return copy.deepcopy(self._manifest["target"])

    @property
    def inputs(self) -> list[dict]:
        """[{name, shape, dtype}] in the order `run()` takes them positionally."""
        return copy.deepcopy(self._manifest["inputs"])

    @property
    def outputs(self) -> list[dict]:
        """[{name, shape, dtype}] in the order the model returns them."""
        return copy.deepcopy(self._manifest["outputs"])

    @property
    def weight_bytes(self) -> int:
        """Bytes of all weights: what one run must read from memory at least once."""
        return sum(int(np.prod(tuple(t.shape))) * np.dtype(str(t.dtype)).itemsize for t in self._params)

    def __repr__(self) -> str:
        ins = ", ".join(f"{s.name}: {s.dtype}{list(s.shape)}" for s in self._input_specs)
        return f"<CompiledModel {self._source} ({ins}) for {self._manifest['target'].get('kind', '?')}>"

    # ------------------------------------------------------------ running

    def run(self, *args, **named) -> dict[str, np.ndarray]:
        """Run the model once.

        Inputs go positionally (in `inputs` order), by name, or as one dict. Each must have
        the manifest's dtype exactly (no silent casts) and its shape. Returns fresh numpy
        arrays keyed by output name. On a GPU, numpy inputs are copied to the device, and
        CUDA tensors (anything with `__dlpack__` on a CUDA device, e.g. torch) are used in place.

        Args:
            *args: the inputs in `inputs` order, or one dict {input name: array}.
            **named: the inputs by name.

        Returns:
            {output name: numpy array}, in `outputs` order; the arrays are the caller's.

        Raises:
            ActsparseError: a missing, extra or misnamed input, a wrong dtype or shape (dynamic
                dimensions must agree across inputs), or a failure inside the model's execution.
        """
        values = self._bind_inputs(args, named)
        if self._gpu is not None:
            tensors = self._device_inputs(values)
        else:
            tensors = [self._tvm_ffi.from_dlpack(a) for a in self._check_inputs(values)]
        try:
            result = call_vm(lambda: self._main()(*tensors, *self._params))
        except ActsparseError:
            raise
        except Exception as exc:  # the VM's own checks (free dims, kernel asserts)
            raise ActsparseError(f"model execution failed: {exc}") from None
        return self._collect_outputs(result)

    def _main(self):
        """This thread's VM entry point, created on first use."""
        main = getattr(self._local, "main", None)
        if main is None:
            vm = self._module["vm_load_executable"]()
            vm["vm_initialization"](*(_CPU_VM_INIT if self._gpu is None else _CUDA_VM_INIT))
            self._local.vm = vm  # keep the VM alive alongside its function
            self._local.main = main = vm["main"]
        return main

    def _function(self, name: str):
        """This thread's VM entry point `name` (an artifact's other functions, e.g. an LM's prefill)."""
        self._main()
        functions = self._local.__dict__.setdefault("functions", {})
        if name not in functions:
            functions[name] = self._local.vm[name]
        return functions[name]

    def _bind_inputs(self, args: tuple, named: dict) -> dict:
        if len(args) == 1 and isinstance(args[0], Mapping):
            named = _merge_named(dict(args[0]), named)
            args = ()
        if len(args) > len(self._input_names):
            raise ActsparseError(
                f"run() takes {len(self._input_names)} inputs ({', '.join(self._input_names)}), got {len(args)}"
            )
        values = dict(zip(self._input_names, args))
        for name, value in named.items():
            if name not in self._input_names:
                raise ActsparseError(f"unknown input {name!r}; the model's inputs are {', '.join(self._input_names)}")
            if name in values:
                raise ActsparseError(f"input {name!r} given twice (by position and by name)")
            values[name] = value
        missing = [name for name in self._input_names if name not in values]
        if missing:
            raise ActsparseError(f"missing input {', '.join(repr(m) for m in missing)}")
        return values

    def _device_inputs(self, values: dict) -> list:
        """GPU tensors for the inputs: CUDA DLPack tensors in place (a copy only when not compact
        or not 16-byte aligned, which the float4 kernels need), host arrays copied over."""
        tensors, free_dims = [], {}
        for spec in self._input_specs:
            value = values[spec.name]
            device = getattr(value, "__dlpack_device__", None)
            if device is not None and device()[0] == ffi.KDL_CUDA:
                tensor = self._tvm_ffi.from_dlpack(value)
                if str(tensor.dtype) != str(spec.dtype) or not spec.shape_matches(tuple(tensor.shape), free_dims):
                    raise ActsparseError(f"input {spec.name!r}: {tensor.dtype}{list(tensor.shape)}, expected "
                                         f"{spec.dtype}{spec.shape}")
                if not tensor.is_contiguous() or tensor.data_ptr() % 16:
                    tensor = self._gpu.copy(tensor)
                tensors.append(tensor)
            else:
                tensors.append(self._gpu.to_device(spec.check(value, free_dims)))
        return tensors

    def _check_inputs(self, values: dict) -> list[np.ndarray]:
        free_dims: dict[str, int] = {}
        return [spec.check(values[spec.name], free_dims) for spec in self._input_specs]

    def _collect_outputs(self, result) -> dict[str, np.ndarray]:
        tensors = [result] if isinstance(result, self._tvm_ffi.Tensor) else list(result)
        if len(tensors) != len(self._output_specs):
            raise ActsparseError(
                f"artifact is inconsistent: the model returned {len(tensors)} outputs, the manifest lists "
                f"{len(self._output_specs)}"
            )
        if self._gpu is not None:
            return {spec["name"]: self._gpu.to_host(t) for spec, t in zip(self._output_specs, tensors)}
        # Copy: the VM's memory pool may hand the same storage to a later run.
        return {spec["name"]: np.from_dlpack(t).copy() for spec, t in zip(self._output_specs, tensors)}


class _InputSpec:
    """One manifest input, with its dtype resolved once."""

    def __init__(self, spec: dict):
        self.name = spec["name"]
        self.shape = list(spec["shape"])
        try:
            self.dtype = np.dtype(spec["dtype"])
        except TypeError:
            raise ActsparseError(f"input {self.name!r}: dtype {spec['dtype']!r} is not supported by numpy") from None
        # What TVM tensors hold: no objects, strings, dates or records, and no complex numbers
        # (TVM aborts the process formatting the dtype error for a complex tensor).
        if self.dtype.kind not in "biuf":
            raise ActsparseError(f"input {self.name!r}: dtype {self.dtype} is not a real-valued tensor type")

    def check(self, value, free_dims: dict[str, int]) -> np.ndarray:
        """The value as a C-contiguous, 64-byte-aligned array, or an ActsparseError saying what is wrong."""
        try:
            array = np.asarray(value)
        except Exception as exc:
            raise ActsparseError(f"input {self.name!r}: not convertible to an array ({exc})") from None
        if array.dtype != self.dtype:
            raise ActsparseError(f"input {self.name!r}: dtype {array.dtype}, expected {self.dtype}")
        if array.ndim != len(self.shape) or not self._dims_match(array.shape, free_dims):
            expected = "(" + ", ".join(str(d) for d in self.shape) + ")"
            raise ActsparseError(f"input {self.name!r}: shape {tuple(array.shape)}, expected {expected}")
        # NaN has no meaning kernels agree on (ReLU's max and sparse thresholds turn it into 0,
        # numpy keeps it): refuse it. +-Inf is legitimate (additive attention masks) and passes.
        if array.dtype.kind in "fc" and np.isnan(array).any():
            raise ActsparseError(f"input {self.name!r} contains NaN")
        return aligned(array)

    def shape_matches(self, shape: tuple, free_dims: dict[str, int]) -> bool:
        return len(shape) == len(self.shape) and self._dims_match(shape, free_dims)

    def _dims_match(self, shape: tuple, free_dims: dict[str, int]) -> bool:
        for size, want in zip(shape, self.shape):
            if isinstance(want, int) and size != want:
                return False
            if isinstance(want, str) and free_dims.setdefault(want, size) != size:
                return False  # the same named dim must have one size across all inputs
        return True


def aligned(array: np.ndarray) -> np.ndarray:
    """`array` itself if C-contiguous, writable and 64-byte aligned, else an aligned copy."""
    if array.flags.c_contiguous and array.flags.writeable and array.ctypes.data % ALIGNMENT == 0:
        return array
    out = aligned_empty(array.nbytes).view(array.dtype).reshape(array.shape)
    np.copyto(out, array)
    return out


def aligned_empty(nbytes: int) -> np.ndarray:
    """Uninitialized uint8 memory of `nbytes` starting on a 64-byte boundary."""
    buffer = np.empty(nbytes + ALIGNMENT, dtype=np.uint8)
    offset = -buffer.ctypes.data % ALIGNMENT
    return buffer[offset:offset + nbytes]


# ---------------------------------------------------------------- loading steps


def _artifact_root(path: Path, workdir: Path) -> Path:
    """The directory holding the artifact's files: `path` itself, or a private extraction of a tar."""
    if path.is_dir():
        return path
    if not path.is_file() or not _is_tar(path):
        raise ActsparseError(f"{path}: not an artifact (expected a directory or a .tar)")
    root = workdir / "artifact"
    root.mkdir(mode=0o700)
    artifact.safe_extract_tar(path, root)
    return root


def _is_tar(path: Path) -> bool:
    try:
        return tarfile.is_tarfile(path)
    except (EOFError, OSError, zlib.error, lzma.LZMAError):  # a truncated compressed file
        return False


def _check_device(target: dict, device: str | None) -> str:
    """The device to run on ("cpu" or "cuda"), or an ActsparseError saying why this machine can't."""
    kind = target.get("kind")
    if device not in (None, "cpu", "cuda"):
        raise ActsparseError(f"device {device!r} is not supported; use 'cpu' or 'cuda'")
    if kind == "cuda":
        if device == "cpu":
            raise ActsparseError("this artifact was compiled for a CUDA GPU; load it with device='cuda'")
        ffi.check_cuda_device(str(target.get("arch", "")))
        return "cuda"
    if device == "cuda":
        raise ActsparseError(f"this artifact was compiled for {kind!r} (a CPU); recompile with --target cuda to run on a GPU")
    if kind not in _CPU_TARGET_KINDS:
        raise ActsparseError(f"artifact targets {kind!r}; this runtime runs CPU (llvm) and cuda artifacts only")
    return "cpu"


def _verified_bytes(root: Path, rel: str, manifest: dict) -> bytes:
    data = (root / rel).read_bytes()
    if hashlib.sha256(data).hexdigest() != manifest["files"][rel]:
        raise ActsparseError(f"artifact {root}: {rel} changed while loading")
    return data


def _verified_private_copy(root: Path, rel: str, manifest: dict, workdir: Path) -> Path:
    """Copy a shared library into the private `workdir` from bytes whose sha256 was just re-checked.

    The library is loaded from that copy, so a file swapped after `verify_files` is never executed.
    """
    data = _verified_bytes(root, rel, manifest)
    target = workdir / "lib" / Path(rel).name
    target.parent.mkdir(mode=0o700, exist_ok=True)
    target.write_bytes(data)
    return target


def _load_module(library: Path):
    tvm_ffi = import_tvm_ffi()
    try:
        return tvm_ffi.load_module(str(library.resolve()))
    except Exception as exc:
        raise ActsparseError(
            f"cannot load the compiled model: {exc} (it is loaded from a private copy under "
            f"{tempfile.gettempdir()}; if that is mounted noexec, point TMPDIR elsewhere)"
        ) from None


_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
                      "I16": np.int16, "I8": np.int8, "U8": np.uint8, "U16": np.uint16, "U32": np.uint32,
                      "U64": np.uint64, "BOOL": np.bool_}
_MAX_HEADER_BYTES = 100 << 20
_READ_CHUNK = 16 << 20


def _load_params(path: Path, names: list[str], sha256: str) -> list:
    """The weights (a safetensors file) as tvm_ffi tensors in manifest order.

    One pass over the file: each tensor is read straight into 64-byte-aligned memory while the
    file's sha256 is computed; a mismatch raises before anything is returned. The format is
    checked strictly (no holes, no overlaps, sizes that match dtype x shape)."""
    from concurrent.futures import ThreadPoolExecutor

    tvm_ffi = import_tvm_ffi()
    digest = hashlib.sha256()
    hasher = ThreadPoolExecutor(1)  # hashes what was read while the next tensor is read (hashlib drops the GIL)
    try:
        arrays = _read_params(path, names, digest, hasher)
    finally:
        hasher.shutdown(wait=True)
    if digest.hexdigest() != sha256:
        raise ActsparseError(f"artifact: {path.name} does not match its sha256 in the manifest (modified or corrupt)")
    return [tvm_ffi.from_dlpack(arrays[name]) for name in names]


def _read_params(path: Path, names: list[str], digest, hasher) -> dict[str, np.ndarray]:
    import json

    def read(handle, size: int) -> bytes:
        data = handle.read(size)
        if len(data) != size:
            raise ActsparseError(f"{path}: truncated params file")
        hasher.submit(digest.update, data)
        return data

    arrays: dict[str, np.ndarray] = {}
    with open(path, "rb") as handle:
        header_size = int.from_bytes(read(handle, 8), "little")
        if header_size > _MAX_HEADER_BYTES:
            raise ActsparseError(f"{path}: unreadable params (header of {header_size} bytes)")
        try:
            header = json.loads(read(handle, header_size))
        except ValueError as exc:
            raise ActsparseError(f"{path}: unreadable params ({exc})") from None
        if not isinstance(header, dict):
            raise ActsparseError(f"{path}: unreadable params (header is not an object)")
        header.pop("__metadata__", None)
        if set(header) != set(names):
            raise ActsparseError(f"artifact: params file and manifest disagree on {sorted(set(header) ^ set(names))[0]!r}")
        data_bytes = os.fstat(handle.fileno()).st_size - 8 - header_size
        if max((_offsets(path, item)[1] for item in header.items()), default=0) > data_bytes:
            raise ActsparseError(f"{path}: unreadable params (tensors extend past the end of the file)")
        cursor = 0
        for name, entry in sorted(header.items(), key=lambda item: _offsets(path, item)[0]):
            begin, end = _offsets(path, (name, entry))
            dtype = _SAFETENSORS_DTYPES.get(entry.get("dtype"))
            shape = entry.get("shape")
            if dtype is None or not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
                raise ActsparseError(f"{path}: unreadable params (tensor {name!r}: dtype/shape)")
            nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
            if begin != cursor or end - begin != nbytes:
                raise ActsparseError(f"{path}: unreadable params (tensor {name!r}: offsets)")
            array = aligned_empty(nbytes)
            view = memoryview(array)
            while view.nbytes:
                count = handle.readinto(view[:_READ_CHUNK])
                if not count:
                    raise ActsparseError(f"{path}: truncated params file")
                hasher.submit(digest.update, view[:count])
                view = view[count:]
            arrays[name] = array.view(dtype).reshape(shape)
            cursor = end
        while chunk := handle.read(1 << 20):  # trailing bytes still count for the checksum
            hasher.submit(digest.update, chunk)
    return arrays


def _offsets(path: Path, item) -> tuple[int, int]:
    name, entry = item
    offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise ActsparseError(f"{path}: unreadable params (tensor {name!r}: data_offsets)")
    return offsets[0], offsets[1]


def _merge_named(first: dict, second: dict) -> dict:
    both = sorted(set(first) & set(second))
    if both:
        raise ActsparseError(f"input {both[0]!r} given twice")
    return {**first, **second}
