"""Bad calibration files fed to `optimize --calib`: wrong names, dtypes, ranks and sample
counts, NaN/Inf, empty arrays, and corrupt .npz bytes (including edited .npy headers)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.reliability.harness import fuzz_settings, run_cli
from tests.reliability.mutations import apply_bytes, byte_mutation

dtypes = st.sampled_from(["float32", "float64", "float16", "int64", "int32", "uint8", "bool", "complex64", "U2",
                          "M8[s]", "V4"])
shapes = st.lists(st.integers(0, 9), max_size=4).map(tuple) | st.sampled_from([(1, 8), (3, 1, 8), (2, 8), (0, 1, 8)])
fills = st.sampled_from([0.0, 1.0, -3.5, np.nan, np.inf, -np.inf, 1e30])
names = st.sampled_from(["x", "y", "X", "x "]) | st.text(min_size=1, max_size=4)


@pytest.fixture(scope="module")
def tiny_path(tiny_models, tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "swiglu.onnx"  # one input x: float32 [1, 8]
    onnx.save(tiny_models["swiglu"], path)
    return path


def _array(dtype: str, shape: tuple, fill: float) -> np.ndarray:
    if np.dtype(dtype).kind in "fc":
        return np.full(shape, fill, dtype=dtype)
    return np.zeros(shape, dtype=dtype)


@fuzz_settings(200)
@given(arrays=st.dictionaries(names, st.tuples(dtypes, shapes, fills), max_size=3),
       mutation=st.none() | st.none() | byte_mutation(),
       passes=st.sampled_from(["measure", "sparsify{sparsity=0.5}", "cleanup"]))
def test_bad_calibration_files(tiny_path, cases, arrays, mutation, passes):
    with cases.new() as folder:
        calib = folder / "calib.npz"
        with open(calib, "wb") as handle:
            np.savez(handle, **{name: _array(*spec) for name, spec in arrays.items()})
        if mutation is not None:
            calib.write_bytes(apply_bytes(calib.read_bytes(), mutation))
        argv = ["optimize", tiny_path, "-o", folder / "out.onnx", f"--passes={passes}", "--calib", calib]
        run_cli(argv, folder, category="optimize: bad calibration", outputs=("out.onnx",))
