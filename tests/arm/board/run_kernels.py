"""Run compiled TIR kernels on the (emulated) board: ``python run_kernels.py SPEC.json``.

Runs on arm64 with only numpy, tvm_ffi, libtvm_runtime.so and the actsparse device package.
SPEC: {"libraries": {alias: path}, "calls": [{"library": alias, "function": name,
"inputs": [.npy paths], "outputs": [{"path", "shape", "dtype"}]}], "maps": path or null}.
All libraries are loaded first; then, if "maps" is given, the executable address ranges of
each library in this process are written there as JSON {alias: [[start, end], ...]} (the
instruction-count test filters qemu's trace by them); then the calls run in order, each
output saved as .npy.
"""

import json
import sys

import numpy as np

from actsparse.runtime.ffi import ensure_tvm_runtime, import_tvm_ffi

ALIGNMENT = 64  # the kernels assume 64-byte aligned buffers


def aligned_copy(array):
    raw = np.empty(array.nbytes + ALIGNMENT, dtype=np.uint8)
    start = (-raw.ctypes.data) % ALIGNMENT
    out = raw[start : start + array.nbytes].view(array.dtype).reshape(array.shape)
    out[...] = array
    return out


def executable_ranges(paths):
    """{alias: [[start, end], ...]} of the r-x mappings of each library file."""
    by_path = {path: alias for alias, path in paths.items()}
    ranges = {alias: [] for alias in paths}
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split()
            if len(fields) >= 6 and "x" in fields[1] and fields[5] in by_path:
                start, end = (int(v, 16) for v in fields[0].split("-"))
                ranges[by_path[fields[5]]].append([start, end])
    return ranges


def main(spec_path):
    with open(spec_path) as handle:
        spec = json.load(handle)
    tvm_ffi = import_tvm_ffi()
    ensure_tvm_runtime()
    modules = {alias: tvm_ffi.load_module(path) for alias, path in spec["libraries"].items()}
    if spec.get("maps"):
        with open(spec["maps"], "w") as out:
            json.dump(executable_ranges(spec["libraries"]), out)
    for call in spec["calls"]:
        inputs = [aligned_copy(np.load(path, allow_pickle=False)) for path in call["inputs"]]
        outputs = [aligned_copy(np.zeros(o["shape"], o["dtype"])) for o in call["outputs"]]
        function = modules[call["library"]][call["function"]]
        function(*[tvm_ffi.from_dlpack(a) for a in inputs + outputs])
        for array, o in zip(outputs, call["outputs"]):
            np.save(o["path"], array)


if __name__ == "__main__":
    main(sys.argv[1])
