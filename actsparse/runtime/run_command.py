"""`actsparse run` on a compiled artifact, with nothing but the runtime's own dependencies
(numpy, safetensors, tvm_ffi): the device-side entry point.

    python -m actsparse.runtime run model.actsparse [--inputs in.npz] [-o out.npz]
"""

from __future__ import annotations

from actsparse.atomic import replace_into  # noqa: E402

import math
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from actsparse.errors import ActsparseError

def run_artifact_command(artifact: str, inputs: str | None, output: str | None, seed: int = 0) -> int:
    """`actsparse run`: load, run once on the inputs (or seeded random ones), save or summarize."""
    from actsparse.runtime import load

    model = load(artifact)
    feeds = artifact_inputs(model, inputs, seed)
    outputs = model.run(feeds)
    if output:
        save_npz_atomic(output, outputs)
        print(f"wrote {output}", file=sys.stderr)
    else:
        for name, value in outputs.items():
            print(f"{name}: {value.dtype}{list(value.shape)} mean={float(np.mean(value)):.6g} "
                  f"std={float(np.std(value)):.6g}")
    return 0


# `run` without --inputs makes random inputs up to this size; larger ones need --inputs.
MAX_RANDOM_INPUT_BYTES = 1 << 30


def artifact_inputs(model, path: str | None, seed: int) -> dict:
    if path is None:
        rng = np.random.default_rng(seed)
        feeds = {}
        for spec in model.inputs:
            shape = [d if isinstance(d, int) else 1 for d in spec["shape"]]
            dtype = np.dtype(spec["dtype"])
            if math.prod(shape) * dtype.itemsize > MAX_RANDOM_INPUT_BYTES:  # checked before allocating
                raise ActsparseError(f"input {spec['name']!r} of shape {shape} is too large for random data; "
                                     f"give --inputs")
            feeds[spec["name"]] = (rng.integers(0, 100, shape).astype(dtype) if np.issubdtype(dtype, np.integer)
                                   else rng.standard_normal(shape).astype(dtype))
        return feeds
    from actsparse.runtime.npz import read_npz

    if not Path(path).is_file():
        raise ActsparseError(f"{path}: no such inputs file")
    return read_npz(path, "inputs file")


def save_npz_atomic(path: str, arrays: dict) -> None:
    target = Path(path)
    if target.suffix != ".npz":
        raise ActsparseError(f"{path}: the outputs file must end in .npz")
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent if str(target.parent) else ".")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        replace_into(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
