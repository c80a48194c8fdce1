"""TVM thread-pool defaults (actsparse/runtime/threads.py)."""

import os
import subprocess
import sys

from actsparse.runtime.threads import DEFAULT_SPIN_COUNT, configure_tvm_threads, cpu_quota, default_thread_count, physical_cores


def _fake_sysfs(tmp_path, topology: dict[int, tuple[int, int]]):
    for cpu, (package, core) in topology.items():
        folder = tmp_path / f"cpu{cpu}" / "topology"
        folder.mkdir(parents=True)
        (folder / "physical_package_id").write_text(f"{package}\n")
        (folder / "core_id").write_text(f"{core}\n")
    return tmp_path


def test_physical_cores_counts_smt_siblings_once(tmp_path):
    sysfs = _fake_sysfs(tmp_path, {0: (0, 0), 1: (0, 1), 2: (0, 0), 3: (0, 1)})
    assert physical_cores([0, 1, 2, 3], sysfs) == 2
    assert physical_cores([0, 2], sysfs) == 1  # an affinity mask of two siblings: one core


def test_physical_cores_without_smt_is_the_cpu_count(tmp_path):
    sysfs = _fake_sysfs(tmp_path, {0: (0, 0), 1: (0, 1)})
    assert physical_cores([0, 1], sysfs) == 2


def test_physical_cores_falls_back_to_the_cpu_count_without_sysfs(tmp_path):
    assert physical_cores([0, 1, 2], tmp_path / "missing") == 3


def test_configure_sets_defaults_and_keeps_user_values():
    env = {}
    values = configure_tvm_threads(env)
    assert int(env["TVM_NUM_THREADS"]) >= 1
    assert env["TVM_THREAD_POOL_SPIN_COUNT"] == str(DEFAULT_SPIN_COUNT)
    assert values == env
    user = {"TVM_NUM_THREADS": "7", "TVM_THREAD_POOL_SPIN_COUNT": "5"}
    assert configure_tvm_threads(user) == {"TVM_NUM_THREADS": "7", "TVM_THREAD_POOL_SPIN_COUNT": "5"}


def test_importing_actsparse_gives_tvm_every_core():
    """TVM alone would take half the cores on x86; after `import actsparse` it takes them all."""
    code = (
        "import os, actsparse, tvm;"
        "from actsparse.runtime.threads import physical_cores;"
        "print(tvm.get_global_func('runtime.NumThreads')(), physical_cores())"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("TVM_")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    tvm_threads, cores = out.split()
    assert tvm_threads == cores


def test_cpu_quota_from_cgroup_v2_and_v1(tmp_path):
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("150000 100000\n")
    assert cpu_quota(v2) == 2
    (v2 / "cpu.max").write_text("max 100000\n")
    assert cpu_quota(v2) is None
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cpu_quota(v1) is None
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("400000\n")
    assert cpu_quota(v1) == 4
    assert cpu_quota(tmp_path / "missing") is None


def test_default_thread_count_is_capped_by_the_quota(monkeypatch):
    import actsparse.runtime.threads as threads

    monkeypatch.setattr(threads, "physical_cores", lambda: 64)
    monkeypatch.setattr(threads, "cpu_quota", lambda: 2)
    assert default_thread_count() == 2
    monkeypatch.setattr(threads, "cpu_quota", lambda: None)
    assert default_thread_count() == 64
