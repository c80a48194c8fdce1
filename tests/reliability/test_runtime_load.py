"""The runtime under load: many threads on one loaded artifact, memory over many runs, and
failed calls between good ones.

The model is the runtime tests' small Relax model (x [2, 8], scale [4] -> y, z), so the
numbers measure the runtime's own overhead, not kernels.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from actsparse.errors import ActsparseError
from actsparse.runtime import artifact, load
from tests.runtime.conftest import K, M, N

THREADS = 8
RUNS_PER_THREAD = 1000


def _cases(count: int, seed: int = 3):
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((N, K)).astype(np.float32), rng.standard_normal(M).astype(np.float32))
            for _ in range(count)]


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _resident_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def test_eight_threads_match_sequential_runs_with_bad_calls_mixed_in(artifact_dir):
    model = load(artifact_dir)
    cases = _cases(32)
    expected = [model.run(x, s) for x, s in cases]
    failures: list[str] = []
    refused = [0] * THREADS
    start = threading.Barrier(THREADS)

    def worker(thread_id: int) -> None:
        try:
            start.wait()
            for i in range(RUNS_PER_THREAD):
                if i % 97 == 13:  # a wrong-shape call now and then must not disturb the others
                    try:
                        model.run(np.zeros((N + 1, K), np.float32), cases[0][1])
                    except ActsparseError:
                        refused[thread_id] += 1
                    continue
                index = (thread_id * 5 + i) % len(cases)
                if not _same(model.run(*cases[index]), expected[index]):
                    failures.append(f"thread {thread_id} run {i}: result differs from the sequential run")
        except Exception as exc:  # collected: a thread's exception would otherwise be lost
            failures.append(f"thread {thread_id}: {exc!r}")

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert failures == []
    assert refused == [len(range(13, RUNS_PER_THREAD, 97))] * THREADS
    assert all(_same(model.run(x, s), want) for (x, s), want in zip(cases, expected))


def test_resident_memory_stays_flat_over_ten_thousand_runs(artifact_dir):
    model = load(artifact_dir)
    x, s = _cases(1)[0]
    for _ in range(1000):  # warm-up: VM pools, allocator arenas
        model.run(x, s)
    warm = _resident_bytes()
    for i in range(10_000):
        model.run(x, s)
        if i % 500 == 0:  # failed calls take the error path, which must not leak either
            with pytest.raises(ActsparseError):
                model.run(x[:1], s)
    grown = _resident_bytes() - warm
    print(f"\nRSS after warm-up {warm / 2**20:.1f} MiB, growth over 10,000 runs {grown / 2**10:.0f} KiB")
    assert grown < 0.05 * warm
    assert grown < 4 * 2**20  # tighter than 5 % of a process that imported TVM: < 400 bytes per run


@pytest.fixture()
def free_dim_artifact(artifact_dir, tmp_path) -> Path:
    """The artifact with its manifest claiming a free first dim: shapes the VM itself refuses
    now pass the runtime's own check, so the VM's error path runs."""
    root = Path(shutil.copytree(artifact_dir, tmp_path / "free"))
    manifest = json.loads((root / artifact.MANIFEST_NAME).read_text())
    manifest["inputs"][0]["shape"] = ["n", K]
    (root / artifact.MANIFEST_NAME).write_text(json.dumps(manifest))
    return root


def test_a_failed_call_does_not_poison_later_calls(artifact_dir, free_dim_artifact):
    model, loose = load(artifact_dir), load(free_dim_artifact)
    cases = _cases(4)
    expected = [model.run(x, s) for x, s in cases]
    for (x, s), want in zip(cases, expected):
        with pytest.raises(ActsparseError, match=r"input 'x': shape \(3, 8\), expected \(2, 8\)"):
            model.run(np.zeros((3, K), np.float32), s)  # refused by the runtime's check
        with pytest.raises(ActsparseError, match=r"dtype float64, expected float32"):
            model.run(x.astype(np.float64), s)
        with pytest.raises(ActsparseError, match=r"model execution failed"):
            loose.run(np.zeros((3, K), np.float32), s)  # refused inside the VM
        assert _same(model.run(x, s), want)
        assert _same(loose.run(x, s), want)
