"""How many threads TVM's runtime uses for our kernels, set before its thread pool exists.

TVM sizes its pool from ``TVM_NUM_THREADS``, else from ``std::thread::hardware_concurrency()``
halved on x86 on the assumption that every core runs two hardware threads. On a machine
without SMT (this project's 2-core VM, most cloud vCPU slices) that gives half the cores:
every ``T.parallel`` kernel ran on one thread and the dense GEMV read at one core's
bandwidth. We count physical cores among the CPUs this process may run on instead, capped by a
container's CPU quota.

TVM's idle workers also spin (``sched_yield``) for 300,000 rounds, ~150 ms here, after
every parallel call, holding a core the rest of the program (or a second engine in a
benchmark) wants; 20,000 rounds (~10 ms) still covers the gaps between the kernels of one
model run. Both are defaults: a value already in the environment wins.
"""

from __future__ import annotations

import os
from pathlib import Path

NUM_THREADS_VAR = "TVM_NUM_THREADS"
SPIN_COUNT_VAR = "TVM_THREAD_POOL_SPIN_COUNT"
DEFAULT_SPIN_COUNT = 20_000


def usable_cpus() -> list[int]:
    """CPUs this process may run on (its affinity mask), or all of them where there is none."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


def physical_cores(cpus: list[int] | None = None, sysfs: Path = Path("/sys/devices/system/cpu")) -> int:
    """Distinct (package, core) pairs among ``cpus``; the CPU count where sysfs does not say."""
    cpus = usable_cpus() if cpus is None else cpus
    cores = set()
    for cpu in cpus:
        topology = sysfs / f"cpu{cpu}" / "topology"
        try:
            package = (topology / "physical_package_id").read_text().strip()
            core = (topology / "core_id").read_text().strip()
        except OSError:
            return max(1, len(cpus))
        cores.add((package, core))
    return max(1, len(cores))


def cpu_quota(cgroup: Path = Path("/sys/fs/cgroup")) -> int | None:
    """CPUs a container's CFS quota allows (cgroup v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``),
    rounded up; None without a quota. A container limited to 2 CPUs on a 64-core host must not
    start 64 threads."""
    try:
        quota, period = (cgroup / "cpu.max").read_text().split()[:2]
        if quota != "max":
            return max(1, -(-int(quota) // int(period)))
        return None
    except (OSError, ValueError):
        pass
    try:
        quota = int((cgroup / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((cgroup / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return max(1, -(-quota // period)) if quota > 0 and period > 0 else None


def default_thread_count() -> int:
    """Physical cores we may run on, capped by the container's CPU quota."""
    cores = physical_cores()
    quota = cpu_quota()
    return min(cores, quota) if quota else cores


def configure_tvm_threads(environ=os.environ) -> dict[str, str]:
    """Set TVM's thread-pool defaults in ``environ`` unless they are set; returns the values in force."""
    if NUM_THREADS_VAR not in environ:  # no sysfs / cgroup reads at import when the user set it
        environ[NUM_THREADS_VAR] = str(default_thread_count())
    environ.setdefault(SPIN_COUNT_VAR, str(DEFAULT_SPIN_COUNT))
    return {NUM_THREADS_VAR: environ[NUM_THREADS_VAR], SPIN_COUNT_VAR: environ[SPIN_COUNT_VAR]}
