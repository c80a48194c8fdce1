"""Which inputs of a sparse-input kernel count as active, shared by the CPU and CUDA kernels.

Modes: ``threshold`` |x| > t; ``scaled`` |x| * scale[k] > t (WINA); ``nonzero`` x != 0 (input
already sparse, e.g. after ReLU). The numpy twin is ``kernels/reference.active_mask``.
"""

from __future__ import annotations

from tvm.script import tirx as T

MODES = ("threshold", "scaled", "nonzero")


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def active_expr(mode: str, value, threshold, scale, channel):
    """Whether ``value`` of input channel ``channel`` counts, as a TIR expression."""
    if mode == "nonzero":
        return value != T.float32(0)
    if mode == "threshold":
        return T.abs(value) > threshold[0]
    return T.abs(value) * scale[channel] > threshold[0]
