"""The runtime does not grow with use: short-lived caller threads, and load -> run -> del cycles
(600 caller threads used to leave 1,200 OS threads; each cycle mapped one more model.so, 5
mappings: 300 cycles were 1,500 more; the allocator may add a few of its own)."""

from __future__ import annotations

import gc
import os
import threading

import numpy as np
import onnx
import pytest

import actsparse
from actsparse.frontend import zoo


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _maps() -> int:
    with open("/proc/self/maps") as handle:
        return sum(1 for _ in handle)


def _rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    path = tmp_path_factory.mktemp("leaks") / "ffn.onnx"
    onnx.save(zoo.swiglu_stack(layers=1, d=64, f=128), path)
    return actsparse.compile(str(path), output=path.with_suffix(".actsparse")).path


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="needs Linux /proc")
def test_short_lived_caller_threads_leave_nothing_behind(artifact):
    model = actsparse.load(artifact)
    x = np.ones((1, 64), np.float32)
    expected = model.run(x=x)["y"]
    results = []

    def call():
        results.append(model.run(x=x)["y"])

    for _ in range(20):  # warm up: the worker pool and its TVM thread pools
        thread = threading.Thread(target=call)
        thread.start()
        thread.join()
    threads, rss = _threads(), _rss_mb()
    for _ in range(500):
        thread = threading.Thread(target=call)
        thread.start()
        thread.join()
    assert _threads() <= threads + 2, f"{_threads() - threads} more OS threads after 500 caller threads"
    assert _rss_mb() - rss < 16
    assert all(np.array_equal(r, expected) for r in results)


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux /proc")
def test_load_run_del_cycles_keep_mappings_and_memory_flat(artifact):
    x = np.ones((1, 64), np.float32)
    for _ in range(10):  # warm up: the first load maps the library, the allocator settles
        model = actsparse.load(artifact)
        model.run(x=x)
        del model
    gc.collect()
    maps, rss = _maps(), _rss_mb()
    for _ in range(300):
        model = actsparse.load(artifact)
        model.run(x=x)
        del model
    gc.collect()
    assert _maps() <= maps + 16, f"{_maps() - maps} more mappings after 300 load/run/del cycles"
    assert _rss_mb() - rss < 10
