"""Per-target choices the CPU kernel factories take as their ``schedule`` argument.

``RowSchedule`` says how the batch-1 row kernels (sparse.py, quant.py, ffn.py, rsparse.py) walk
active rows and how far ahead the dense panel streams (dense.py, ffn.py, probe.py) prefetch.
``row_schedule_for`` picks one per target; the lowering passes ``TargetInfo.row_schedule`` to
every kernel it builds. A factory called without one builds for ``X86_ROWS``.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass

from tvm.script import tirx as T


@T.macro
def prefetch_l2(address):
    """Prefetch the cache line at ``address`` (T.address_of(buf[...])) into L2 (llvm.prefetch: read,
    locality 2, data).
    Short scattered rows (1-11 KB) get no help from the hardware prefetchers, which stop at page
    boundaries and need a few misses to lock on; L2 rather than L1 measured faster here."""
    T.evaluate(T.call_llvm_intrin("void", "llvm.prefetch.p0", address, 0, 2, 1))


@dataclass(frozen=True)
class RowSchedule:
    """How the batch-1 row kernels walk the active rows: rows per step, and how many steps ahead
    they prefetch the rows into L2 (0: no prefetch instructions); and how many bytes ahead of
    their reads the dense panel streams prefetch (0: none)."""

    rows_per_step: int
    prefetch_steps: int
    task_lists: bool  # each parallel task lists its own range of channels (else: one serial list first)
    stream_prefetch_bytes: int = 0


# x86 (measured, 2-core Zen 4, weights out of cache): the L2 prefetch 1 step ahead was 3-15 %
# faster than none and 2 steps no better; with it, 8 rows per step beat 16 by 0-11 %.
# Per-task lists took the serial compaction (3-6 us at K=2816) out of the call.
# Dense panel streams: one prefetch per 128 bytes read, 16 KB (four pages) ahead, made the dense
# FFN stack 10-12 % faster (8 and 32 KB: a little less; a plain two-thread read of the same bytes
# gained 13 %). The hardware prefetchers stop at every 4 KB page boundary and restart on misses;
# the prefetch has the next pages' lines on their way before the stream gets there.
X86_ROWS = RowSchedule(rows_per_step=8, prefetch_steps=1, task_lists=True, stream_prefetch_bytes=16384)
# Elsewhere (the Pi 4's Cortex-A72): nothing measured on the device; under qemu the prefetch's
# address arithmetic and 8-row steps took the 50 %-sparse kernel from 0.47x to 0.85x the dense
# kernel's instructions, and per-task lists (each padded to whole steps) to 0.64x, so it keeps
# 16 rows per step, one list and no prefetch.
PLAIN_ROWS = RowSchedule(rows_per_step=16, prefetch_steps=0, task_lists=False)


def row_schedule_for(target) -> RowSchedule:
    """The batch-1 row schedule for a TVM target: X86_ROWS for x86 LLVM targets, else PLAIN_ROWS."""
    if target is None or target.kind.name != "llvm":
        return PLAIN_ROWS
    triple = str(target.attrs.get("mtriple", "")) or platform.machine()
    return X86_ROWS if triple.startswith(("x86_64", "i686", "AMD64", "amd64")) else PLAIN_ROWS


def stream_prefetch_macro(element_bytes: int, ahead_bytes: int):
    """T.macro(flat, offset): prefetch the element ``ahead_bytes`` (usually the target schedule's
    ``stream_prefetch_bytes``) past ``flat[offset]`` into L2, clamped to the buffer's end; nothing
    at all when that distance is 0. ``flat`` is a 1-D view of the stream's buffer; callers issue
    one per step of their stream (128 bytes in the panel GEMVs, 256 in the read probe)."""
    ahead_elements = ahead_bytes // element_bytes

    @T.macro
    def prefetch_stream(flat, offset):
        if ahead_elements > 0:
            prefetch_l2(T.address_of(flat[T.min(offset + ahead_elements, flat.shape[0] - 1)]))

    return prefetch_stream
