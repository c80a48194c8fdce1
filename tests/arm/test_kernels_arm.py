"""The CPU TIR kernels built for the Raspberry Pi 4 (``rpi4``: Cortex-A72, NEON), cross-linked
with aarch64-linux-gnu-g++, run on the emulated board through tvm_ffi.

(a) every kernel matches numpy to 1e-4; (b) the sparse-input kernel executes at most
(1 - s + 0.1) x the instructions of the dense one at input sparsity s (counted under qemu,
see tests/arm/qemu_trace.py).
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("tvm")

from actsparse.codegen.kernels import reference as ref  # noqa: E402
from actsparse.codegen.kernels.cpu import dense_matmul, pack_dense, sparse_matmul, vector_lanes  # noqa: E402
from actsparse.codegen.kernels.cpu.rsparse import pack_rank_sparse, rank_sparse_matmul  # noqa: E402
from actsparse.codegen.kernels.cpu.schedule import PLAIN_ROWS, row_schedule_for  # noqa: E402
from tests.arm.conftest import BOARD_SCRIPTS, export_arm_library  # noqa: E402
from tests.arm.qemu_trace import run_counted  # noqa: E402

pytestmark = pytest.mark.slow

ATOL = RTOL = 1e-4
RUNNER = BOARD_SCRIPTS / "run_kernels.py"
# The sparse kernel's register block of y is 2 x lanes floats (m <= 4). With NEON's default
# 4 lanes that is 2 q-registers, and the per-row index/coefficient loads cost more than the
# FMAs they feed: measured 0.78 x the dense kernel's instructions at 50 % sparsity. lanes=16
# (8 q-registers, of NEON's 32) amortizes them: 0.47 x. See docs/arm.md.
SPARSE_NEON_LANES = 16


def _rand(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def _threshold_leaving(magnitude: np.ndarray, active_fraction: float) -> np.float32:
    """A threshold halfway between two magnitudes that leaves about `active_fraction` active."""
    ordered = np.sort(magnitude.ravel())
    cut = int((1 - active_fraction) * ordered.size)
    return np.float32((ordered[cut - 1] + ordered[cut]) / 2)


def _kernel_cases(lanes: int) -> dict[str, dict]:
    """{symbol: {func, inputs, expected}} covering every kernel, tails and batches."""
    rng = np.random.default_rng(2024)
    cases = {}
    for m, k, n in [(1, 37, 45), (3, 33, 70)]:
        x, w = _rand(rng, m, k), _rand(rng, k, n)
        cases[f"dense_{m}x{k}x{n}"] = dict(
            func=dense_matmul(m, k, n, lanes=lanes),
            inputs=[x, pack_dense(w, block=2 * lanes)],
            expected=ref.dense_matmul_reference(x, w),
        )
    for (m, k, n), kernel_lanes in [((1, 70, 45), lanes), ((3, 40, 100), lanes), ((1, 96, 100), SPARSE_NEON_LANES)]:
        x, w = _rand(rng, m, k), _rand(rng, k, n)
        scale = rng.uniform(0.2, 3.0, k).astype(np.float32)
        t = _threshold_leaving(np.abs(x), 0.4)
        ts = _threshold_leaving(np.abs(x) * scale, 0.4)
        x_zeros = np.where(rng.random((m, k)) < 0.6, 0, x).astype(np.float32)
        suffix = f"{m}x{k}x{n}_l{kernel_lanes}"
        cases[f"threshold_{suffix}"] = dict(
            func=sparse_matmul(m, k, n, mode="threshold", lanes=kernel_lanes),
            inputs=[x, np.array([t]), w],
            expected=ref.sparse_matmul_reference(x, w, "threshold", t),
        )
        cases[f"scaled_{suffix}"] = dict(
            func=sparse_matmul(m, k, n, mode="scaled", lanes=kernel_lanes),
            inputs=[x, np.array([ts]), scale, w],
            expected=ref.sparse_matmul_reference(x, w, "scaled", ts, scale),
        )
        cases[f"nonzero_{suffix}"] = dict(
            func=sparse_matmul(m, k, n, mode="nonzero", lanes=kernel_lanes),
            inputs=[x_zeros, w],
            expected=ref.sparse_matmul_reference(x_zeros, w, "nonzero"),
        )
    # R-Sparse (kept rows of W + rows of B in one walk), in the Pi's row schedule, both lane widths.
    for (k, n, rank), kernel_lanes in [((70, 45, 5), lanes), ((96, 100, 20), SPARSE_NEON_LANES)]:
        x, w, a, b = _rand(rng, 1, k), _rand(rng, k, n), _rand(rng, k, rank), _rand(rng, rank, n)
        scale = rng.uniform(0.2, 3.0, k).astype(np.float32)
        t = _threshold_leaving(np.abs(x) * scale, 0.3)
        func = rank_sparse_matmul(k, n, rank, lanes=kernel_lanes, schedule=PLAIN_ROWS)
        cases[f"rsparse_1x{k}x{n}_r{rank}_l{kernel_lanes}"] = dict(
            func=func,
            inputs=[x, np.array([t]), scale, *pack_rank_sparse(w, a, b, kernel_lanes)],
            expected=ref.rank_sparse_matmul_reference(x, t, scale, w, a, b),
        )
    # Every channel below the threshold: the kernel must write zeros, not leave garbage.
    x, w = _rand(rng, 1, 50), _rand(rng, 50, 45)
    cases["threshold_all_inactive"] = dict(
        func=sparse_matmul(1, 50, 45, mode="threshold", lanes=lanes),
        inputs=[x, np.array([np.abs(x).max() + 1], np.float32), w],
        expected=np.zeros((1, 45), np.float32),
    )
    return cases


def _write_spec(work, libraries: dict[str, str], calls: list[tuple[str, str, list, tuple]], maps=None):
    """Save inputs as .npy and the runner's spec; calls: (library alias, symbol, inputs, output shape)."""
    spec_calls = []
    for number, (alias, symbol, inputs, shape) in enumerate(calls):
        paths = []
        for position, array in enumerate(inputs):
            paths.append(str(work / f"in-{number}-{position}.npy"))
            np.save(paths[-1], np.ascontiguousarray(array, dtype=np.float32))
        output = {"path": str(work / f"out-{number}.npy"), "shape": list(shape), "dtype": "float32"}
        spec_calls.append({"library": alias, "function": symbol, "inputs": paths, "outputs": [output]})
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps({"libraries": libraries, "calls": spec_calls, "maps": maps and str(maps)}))
    return spec_path, [c["outputs"][0]["path"] for c in spec_calls]


@pytest.fixture(scope="module")
def arm_kernel_results(run_on_arm, rpi4_target, tmp_path_factory):
    """(library path, {symbol: (output on the emulated board, numpy reference)}): one library, one qemu run."""
    lanes = vector_lanes(rpi4_target)
    assert lanes == 4, "rpi4 (Cortex-A72) has 128-bit NEON vectors"
    work = tmp_path_factory.mktemp("arm-kernels")
    cases = _kernel_cases(lanes)
    library = export_arm_library({name: case["func"] for name, case in cases.items()}, rpi4_target, work / "kernels.so")
    calls = [("lib", name, case["inputs"], case["expected"].shape) for name, case in cases.items()]
    spec_path, outputs = _write_spec(work, {"lib": str(library)}, calls)
    run_on_arm(RUNNER, spec_path)
    return library, {name: (np.load(path), case["expected"]) for (name, case), path in zip(cases.items(), outputs)}


def test_library_is_aarch64_elf(arm_kernel_results):
    library, _ = arm_kernel_results
    header = library.read_bytes()[:20]
    assert header[:4] == b"\x7fELF"
    assert int.from_bytes(header[18:20], "little") == 183  # e_machine EM_AARCH64


@pytest.mark.parametrize(
    "symbol",
    [
        "dense_1x37x45",
        "dense_3x33x70",
        *[
            f"{mode}_{shape}"
            for mode in ("threshold", "scaled", "nonzero")
            for shape in ("1x70x45_l4", "3x40x100_l4", "1x96x100_l16")
        ],
        "threshold_all_inactive",
        "rsparse_1x70x45_r5_l4",
        "rsparse_1x96x100_r20_l16",
    ],
)
def test_kernel_on_arm_matches_numpy(arm_kernel_results, symbol):
    got, expected = arm_kernel_results[1][symbol]
    np.testing.assert_allclose(got, expected, atol=ATOL, rtol=RTOL)


def test_sparse_kernel_executes_proportionally_fewer_instructions(arm_board, arm_device_package, rpi4_target, tmp_path):
    """At input sparsity s the sparse NEON kernel runs <= (1 - s + 0.1) x the dense kernel's
    instructions (the better of the dense kernel at 4 and 8 lanes), counted under qemu."""
    m, k, n = 1, 512, 512
    rng = np.random.default_rng(5)
    x, w = _rand(rng, m, k), _rand(rng, k, n)
    libraries, calls, expected = {}, [], {}
    for dense_lanes in (4, 8):
        alias = f"dense{dense_lanes}"
        kernel = dense_matmul(m, k, n, lanes=dense_lanes)
        libraries[alias] = str(export_arm_library({"kernel": kernel}, rpi4_target, tmp_path / f"{alias}.so"))
        calls.append((alias, "kernel", [x, pack_dense(w, block=2 * dense_lanes)], (m, n)))
        expected[alias] = ref.dense_matmul_reference(x, w)
    # as the lowering builds it for the Pi
    kernel = sparse_matmul(m, k, n, mode="nonzero", lanes=SPARSE_NEON_LANES, schedule=row_schedule_for(rpi4_target))
    sparse = export_arm_library({"kernel": kernel}, rpi4_target, tmp_path / "sparse.so")
    for sparsity in (0.5, 0.9):
        alias = f"sparse{int(sparsity * 100)}"
        # One copy of the library per sparsity: its own address range in the trace.
        libraries[alias] = str(shutil.copyfile(sparse, tmp_path / f"{alias}.so"))
        xs = x.copy()
        xs[:, rng.permutation(k)[: int(sparsity * k)]] = 0
        calls.append((alias, "kernel", [xs, w], (m, n)))
        expected[alias] = ref.sparse_matmul_reference(xs, w, "nonzero")
    spec_path, outputs = _write_spec(tmp_path, libraries, calls, maps=tmp_path / "maps.json")

    counts = run_counted(
        arm_board,
        RUNNER,
        spec_path,
        tmp_path / "maps.json",
        pythonpath=[arm_device_package, BOARD_SCRIPTS],
        env={"TVM_NUM_THREADS": "1"},
    )

    for (alias, *_), path in zip(calls, outputs):
        np.testing.assert_allclose(np.load(path), expected[alias], atol=ATOL, rtol=RTOL)
    dense = min(counts["dense4"], counts["dense8"])
    assert dense > k * n // 4, f"implausibly few dense instructions: {dict(counts)}"
    for sparsity in (0.5, 0.9):
        ratio = counts[f"sparse{int(sparsity * 100)}"] / dense
        assert ratio <= 1 - sparsity + 0.1, f"sparsity {sparsity}: {ratio:.3f} x dense instructions ({dict(counts)})"
