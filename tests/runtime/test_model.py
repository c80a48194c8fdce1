"""Running a loaded artifact: input checks, alignment, threads, and a torch-free cold start."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from actsparse.errors import ActsparseError
from actsparse.runtime import load
from actsparse.runtime.model import ALIGNMENT, aligned
from tests.runtime.conftest import K, M, N, reference

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model(artifact_dir):
    return load(artifact_dir)


def _assert_matches(got, x, scale, params):
    want = reference(x, scale, params)
    for name in ("y", "z"):
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- calling conventions


def test_positional_named_and_dict_calls_agree(model, inputs, params):
    x, scale = inputs["x"], inputs["scale"]
    for got in (model.run(x, scale), model.run(x=x, scale=scale), model.run(inputs), model.run(x, scale=scale)):
        _assert_matches(got, x, scale, params)


def test_outputs_are_fresh_arrays(model, inputs):
    first = model.run(inputs)
    first["y"][:] = 123.0
    second = model.run(inputs)
    assert not np.any(second["y"] == 123.0)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda m, x, s: m.run(x), r"missing input 'scale'"),
        (lambda m, x, s: m.run(x, s, s), r"run\(\) takes 2 inputs \(x, scale\), got 3"),
        (lambda m, x, s: m.run(x, s, bias=s), r"unknown input 'bias'; the model's inputs are x, scale"),
        (lambda m, x, s: m.run(x, s, x=x), r"input 'x' given twice"),
        (lambda m, x, s: m.run({"x": x}, x=x, scale=s), r"input 'x' given twice"),
        (lambda m, x, s: m.run(x.astype(np.float64), s), r"input 'x': dtype float64, expected float32"),
        (lambda m, x, s: m.run(x.astype(np.int32), s), r"input 'x': dtype int32, expected float32"),
        (lambda m, x, s: m.run(x[:1], s), r"input 'x': shape \(1, 8\), expected \(2, 8\)"),
        (lambda m, x, s: m.run(x.reshape(-1), s), r"input 'x': shape \(16,\), expected \(2, 8\)"),
        (lambda m, x, s: m.run(x, [1.0, 2.0, 3.0, 4.0]), r"input 'scale': dtype float64, expected float32"),
    ],
)
def test_bad_inputs_give_clear_errors_and_later_calls_work(model, inputs, params, call, message):
    x, scale = inputs["x"], inputs["scale"]
    with pytest.raises(ActsparseError, match=message):
        call(model, x, scale)
    _assert_matches(model.run(x, scale), x, scale, params)


def test_unaligned_strided_and_readonly_inputs_are_handled(model, inputs, params):
    x, scale = inputs["x"], inputs["scale"]
    raw = np.empty(x.size * 4 + ALIGNMENT + 4, dtype=np.uint8)
    start = (-raw.ctypes.data % ALIGNMENT) + 4  # 4 bytes past a 64-byte boundary
    unaligned = raw[start : start + x.nbytes].view(np.float32).reshape(x.shape)
    unaligned[:] = x
    assert unaligned.ctypes.data % ALIGNMENT == 4
    strided = np.asfortranarray(x)
    readonly = scale.copy()
    readonly.flags.writeable = False
    for value in (unaligned, strided):
        _assert_matches(model.run(value, readonly), x, scale, params)


def test_aligned_copies_only_when_needed():
    base = aligned(np.arange(64, dtype=np.float32))
    assert base.ctypes.data % ALIGNMENT == 0
    assert aligned(base) is base
    shifted = aligned(base[1:])
    assert shifted.ctypes.data % ALIGNMENT == 0 and np.array_equal(shifted, base[1:])
    empty = aligned(np.zeros((0, 3), dtype=np.float32)[:, 1:])
    assert empty.shape == (0, 2)


# ---------------------------------------------------------------- threads


def test_eight_threads_match_sequential_results(model, params):
    rng = np.random.default_rng(3)
    cases = [
        (rng.standard_normal((N, K)).astype(np.float32), rng.standard_normal(M).astype(np.float32)) for _ in range(16)
    ]
    expected = [model.run(x, s) for x, s in cases]
    failures: list[str] = []

    def worker(thread_id: int) -> None:
        try:
            for i in range(200):
                index = (thread_id * 7 + i) % len(cases)
                got = model.run(*cases[index])
                if not all(np.array_equal(got[k], expected[index][k]) for k in ("y", "z")):
                    failures.append(f"thread {thread_id} run {i}: result differs")
        except Exception as exc:  # collected: an exception in a thread would otherwise be lost
            failures.append(f"thread {thread_id}: {exc!r}")

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    _assert_matches(expected[0], *cases[0], params)


# ---------------------------------------------------------------- fresh processes

_COLD_START = r"""
import json, sys, time
start = time.perf_counter()
import numpy as np
import actsparse.runtime as runtime
model = runtime.load(sys.argv[1])
out = model.run(np.ones((2, 8), np.float32), np.ones(4, np.float32))
elapsed = time.perf_counter() - start
maps = open("/proc/self/maps").read()
loaded = sorted({line.split()[-2] if line.endswith("(deleted)") else line.split()[-1]
                 for line in maps.splitlines() if "libtvm_runtime.so" in line})
print(json.dumps({
    "seconds": elapsed,
    "modules": sorted(m for m in ("tvm", "torch", "onnx", "onnxruntime", "onnx_ir") if m in sys.modules),
    "runtime_libs": loaded,
    "y": out["y"].tolist(),
}))
"""


def _run_fresh(artifact_path: Path, **env) -> dict:
    environment = {k: v for k, v in os.environ.items() if k != "ACTSPARSE_TVM_RUNTIME"}
    environment.update(env)
    done = subprocess.run(
        [sys.executable, "-c", _COLD_START, str(artifact_path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=environment,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_fresh_process_runs_without_tvm_torch_or_onnx(artifact_tar, params, record_property):
    result = _run_fresh(artifact_tar)
    assert result["modules"] == []
    ones = reference(np.ones((2, 8), np.float32), np.ones(4, np.float32), params)
    np.testing.assert_allclose(result["y"], ones["y"], rtol=1e-5, atol=1e-6)
    record_property("cold_start_seconds", result["seconds"])
    print(f"\ncold start (import + load .tar + first run): {result['seconds'] * 1e3:.0f} ms")


def test_fresh_process_uses_the_bundled_runtime(write, tmp_path):
    path = write(tmp_path / "bundled", bundle_runtime=True)
    assert (path / "lib" / "libtvm_runtime.so").is_file()
    result = _run_fresh(path)
    assert len(result["runtime_libs"]) == 1
    assert "site-packages" not in result["runtime_libs"][0]  # the private copy of the bundled library


def test_missing_runtime_named_by_environment_is_refused(artifact_dir):
    done = subprocess.run(
        [sys.executable, "-c", _COLD_START, str(artifact_dir)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "ACTSPARSE_TVM_RUNTIME": "/nonexistent/libtvm_runtime.so"},
        timeout=120,
    )
    assert done.returncode != 0
    assert "ActsparseError: ACTSPARSE_TVM_RUNTIME=/nonexistent/libtvm_runtime.so: no such file" in done.stderr
