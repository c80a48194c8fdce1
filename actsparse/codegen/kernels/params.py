"""One TVMScript body for kernel variants that differ only in an optional buffer parameter."""

from __future__ import annotations


def without_params(func, unused: set[str]):
    """The PrimFunc without the buffer parameters named in ``unused`` (the body must not use them).

    A kernel is written once with every optional buffer (a threshold, a per-channel scale, zero
    points, a ReLU shift); each variant drops the ones it does not read, keeping the order of the rest.
    """
    from tvm import tirx

    kept = [p for p in func.params if p.name not in unused]
    return tirx.PrimFunc(kept, func.body, func.ret_type, func.attrs)
