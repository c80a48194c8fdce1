"""Count the aarch64 instructions a kernel executes under qemu-aarch64 (no board, no perf).

Debian's qemu-user-static (7.2) is a static binary without TCG plugin support (no
``-plugin``; a static qemu cannot dlopen ``libinsn.so``), and valgrind cannot run aarch64
code on x86. qemu's own logging can count exactly, though:

- ``-d in_asm`` prints every translated block (TB) with its guest instructions, so the
  number of instructions per TB start address is known;
- ``-d exec`` prints one line per executed TB, and ``nochain`` makes every execution go
  through the logged dispatcher (chained TBs would jump to each other unlogged);
- ``-dfilter START..END`` restricts both to the kernel libraries' code, so the Python
  interpreter's hundreds of millions of instructions are neither logged nor slowed down.

Executed instructions = sum over exec lines of the size of that TB. (A TB left early by a
fault would be over-counted; kernels do not fault.) The libraries' load addresses come
from a first, untraced run (``/proc/self/maps``); qemu-user places a deterministic
sequence of mmaps at the same guest addresses, and the traced run re-checks that.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path


def dfilter_ranges(ranges: dict[str, list[list[int]]]) -> str:
    """qemu's ``-dfilter`` value for the given {alias: [[start, end), ...]} ranges."""
    return ",".join(f"0x{start:x}..0x{end - 1:x}" for spans in ranges.values() for start, end in spans)


def trace_qemu_args(ranges: dict[str, list[list[int]]], log_path: Path) -> list[str]:
    return ["-d", "in_asm,exec,nochain", "-dfilter", dfilter_ranges(ranges), "-D", str(log_path)]


def count_instructions(log_path: Path, ranges: dict[str, list[list[int]]]) -> Counter:
    """{alias: executed guest instructions} from a qemu ``in_asm,exec,nochain`` log."""
    spans = [(start, end, alias) for alias, pairs in ranges.items() for start, end in pairs]
    tb_size: dict[int, int] = {}
    counts: Counter = Counter()
    block_start = None
    with open(log_path, encoding="utf-8", errors="replace") as log:
        for line in log:
            if line.startswith("IN:"):
                block_start = None
            elif line.startswith("0x") and ":" in line:
                pc = int(line.split(":", 1)[0], 16)
                if block_start is None:
                    block_start = pc
                    tb_size[pc] = 0
                tb_size[block_start] += 1
            elif line.startswith("Trace "):
                block_start = None
                # Trace <cpu>: <host ptr> [<cs_base>/<pc>/<flags>/<cflags>] <symbol>
                pc = int(line.split("[", 1)[1].split("/", 2)[1], 16)
                owner = next((alias for start, end, alias in spans if start <= pc < end), None)
                if owner is not None:
                    counts[owner] += tb_size[pc]
    return counts


def run_counted(board, script, spec_path: Path, maps_path: Path, *, pythonpath, env) -> Counter:
    """Run `script SPEC` twice on the board (untraced to learn the load addresses, then traced).

    `script` must write the executable ranges of its libraries to `maps_path` (see
    tests/arm/board/run_kernels.py). Returns the executed instructions per library alias.
    """
    board.run_python([script, spec_path], pythonpath=pythonpath, env=env)
    ranges = json.loads(maps_path.read_text())
    missing = [alias for alias, spans in ranges.items() if not spans]
    assert not missing, f"no executable mapping found for {missing}"
    log_path = spec_path.with_suffix(".trace.log")
    board.run_python([script, spec_path], pythonpath=pythonpath, env=env, qemu_args=trace_qemu_args(ranges, log_path))
    traced_ranges = json.loads(maps_path.read_text())
    assert traced_ranges == ranges, "qemu loaded the libraries at other addresses in the traced run"
    try:
        return count_instructions(log_path, ranges)
    finally:
        log_path.unlink(missing_ok=True)
