"""Calibration sets: a list of feeds (input name -> array), from an .npz file or generated.

An .npz holds one array per model input. An array with one more axis than the input
holds several samples stacked on axis 0; one with the input's rank is a single sample.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx_ir as ir

from actsparse.errors import ActsparseError
from actsparse.runtime.npz import read_npz  # noqa: F401  (re-exported: calibration files)

Feeds = dict[str, np.ndarray]

DEFAULT_SEQUENCE_LENGTH = 16
DEFAULT_SAMPLES = 8
# Generated inputs are refused above this many elements in all: a signature dim of
# 2**40, from a corrupt or hostile model, must not turn into an allocation.
MAX_GENERATED_ELEMENTS = 1 << 28


def model_inputs(model: ir.Model) -> list[ir.Value]:
    """Graph inputs that are real inputs (not initializers listed as inputs)."""
    return [v for v in model.graph.inputs if v.name not in model.graph.initializers]


def load_calibration(path: str | Path, model: ir.Model) -> list[Feeds]:
    path = Path(path)
    if not path.is_file():
        raise ActsparseError(f"{path}: no such calibration file")
    return feeds_from_arrays(read_npz(path, "calibration file", check=_header_check(model, str(path))), model,
                             source=str(path))


def _header_check(model: ir.Model, source: str):
    """Refuse names, ranks and static dims that cannot match, from the .npz headers alone."""
    inputs = {v.name: v for v in model_inputs(model)}

    def check(name: str, shape: tuple, dtype) -> None:
        value = inputs.get(name)
        if value is None:  # the full check names every missing and unknown input
            return
        if value.shape is None:
            return
        rank = len(value.shape)
        if len(shape) not in (rank, rank + 1):
            raise ActsparseError(f"{source}: input {name!r} has rank {len(shape)}, model expects {rank} "
                                 f"(or {rank + 1} stacked)")
        sample = shape[len(shape) - rank:]
        for axis, (got, want) in enumerate(zip(sample, value.shape)):
            if isinstance(want, int) and got != want:  # the same words as the check after loading
                raise ActsparseError(f"{source}: input {name!r} axis {axis} is {got}, model expects {want}")

    return check


def feeds_from_arrays(arrays: dict[str, np.ndarray], model: ir.Model, *, source: str = "calibration") -> list[Feeds]:
    inputs = {v.name: v for v in model_inputs(model)}
    missing = [name for name in inputs if name not in arrays]
    unknown = [name for name in arrays if name not in inputs]
    if missing or unknown:
        parts = ([f"missing inputs {missing}"] if missing else []) + ([f"unknown names {unknown}"] if unknown else [])
        raise ActsparseError(f"{source}: {'; '.join(parts)} (model inputs: {list(inputs)})")
    stacked: dict[str, np.ndarray] = {}
    for name, value in inputs.items():
        array = np.asarray(arrays[name])
        rank = len(value.shape) if value.shape is not None else array.ndim
        if array.ndim == rank:
            array = array[None]
        elif array.ndim != rank + 1:
            raise ActsparseError(f"{source}: input {name!r} has rank {array.ndim}, model expects {rank} (or {rank + 1} stacked)")
        array = _cast(array, value, source)
        if array.shape[0] == 0:
            raise ActsparseError(f"{source}: no samples for input {name!r}")
        _check_dims(array[0], value, source)
        if array[0].size == 0:  # statistics over no values would be 0/0
            raise ActsparseError(f"{source}: input {name!r} samples are empty (shape {array.shape[1:]})")
        stacked[name] = array
    counts = {name: a.shape[0] for name, a in stacked.items()}
    if len(set(counts.values())) > 1:
        raise ActsparseError(f"{source}: inputs have different sample counts {counts}")
    count = next(iter(counts.values()), 0)
    if count == 0:
        raise ActsparseError(f"{source}: no samples")
    return [{name: np.ascontiguousarray(a[i]) for name, a in stacked.items()} for i in range(count)]


def numpy_dtype(value: ir.Value) -> np.dtype | None:
    """The numpy dtype of a model input; None when the model leaves it unknown or it has none."""
    if value.dtype is None:
        return None
    try:
        return np.dtype(value.dtype.numpy())
    except TypeError:  # UNDEFINED and other types numpy cannot hold
        return None


def _cast(array: np.ndarray, value: ir.Value, source: str) -> np.ndarray:
    dtype = numpy_dtype(value)
    if dtype is None:
        if value.dtype is not None:
            raise ActsparseError(f"{source}: input {value.name!r} has dtype {value.dtype}, which numpy cannot hold")
        dtype = array.dtype
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        raise ActsparseError(f"{source}: input {value.name!r} contains NaN or Inf")
    if array.dtype == dtype:
        return array
    # Documented casts (docs/safety.md): another float precision or byte order to the model's
    # float type; integers to the model's integer type when every value fits. Anything else is refused.
    both_float = np.issubdtype(array.dtype, np.floating) and np.issubdtype(dtype, np.floating)
    both_int = np.issubdtype(array.dtype, np.integer) and np.issubdtype(dtype, np.integer)
    if not both_float and not both_int and array.dtype.newbyteorder("=") != dtype:
        raise ActsparseError(f"{source}: input {value.name!r} has dtype {array.dtype}, model expects {dtype}")
    if both_int and array.size:
        limits = np.iinfo(dtype)
        if array.min() < limits.min or array.max() > limits.max:
            raise ActsparseError(f"{source}: input {value.name!r} has values outside {dtype} "
                                 f"({array.min()}..{array.max()}); model expects {dtype}")
    if both_float and np.finfo(array.dtype).max > np.finfo(dtype).max and np.abs(array).max(initial=0) > np.finfo(dtype).max:
        raise ActsparseError(f"{source}: input {value.name!r} has values beyond {dtype}'s range")
    return array.astype(dtype)


def _check_dims(sample: np.ndarray, value: ir.Value, source: str) -> None:
    if value.shape is None:
        return
    for axis, (want, got) in enumerate(zip(value.shape, sample.shape)):
        if isinstance(want, int) and want != got:
            raise ActsparseError(f"{source}: input {value.name!r} axis {axis} is {got}, model expects {want}")


def generate_calibration(
    model: ir.Model, num_samples: int = DEFAULT_SAMPLES, *, sequence_length: int = DEFAULT_SEQUENCE_LENGTH, seed: int = 0
) -> list[Feeds]:
    """Deterministic inputs from the input signature: random token ids below the vocabulary
    size for token inputs, ones for attention masks, standard normal for float inputs."""
    rng = np.random.default_rng(seed)
    inputs = model_inputs(model)
    shapes = {v.name: _concrete_shape(v, sequence_length) for v in inputs}
    total = num_samples * sum(math.prod(shape) for shape in shapes.values())
    if total > MAX_GENERATED_ELEMENTS:
        raise ActsparseError(f"{num_samples} generated samples of shapes {list(shapes.values())} are too large "
                             f"({total} elements); give calibration data with --calib")
    samples = []
    for _ in range(num_samples):
        feeds = {}
        for value in inputs:
            feeds[value.name] = _generate_one(model, value, shapes[value.name], rng)
        samples.append(feeds)
    return samples


def _concrete_shape(value: ir.Value, sequence_length: int) -> tuple[int, ...]:
    if value.shape is None:
        raise ActsparseError(f"input {value.name!r} has unknown rank; give calibration data with --calib")
    dims = []
    for axis, dim in enumerate(value.shape):
        if isinstance(dim, int):
            dims.append(dim)
        else:  # symbolic: batch 1 on the first axis, the sequence length elsewhere
            dims.append(1 if axis == 0 and len(value.shape) > 1 else sequence_length)
    # Each dim too: (0, 2**62) has no elements, yet numpy refuses to create it.
    if any(d < 0 or d > MAX_GENERATED_ELEMENTS for d in dims) or math.prod(dims) > MAX_GENERATED_ELEMENTS:
        raise ActsparseError(f"input {value.name!r} has shape {tuple(dims)}: negative or too large to generate "
                             f"calibration data for; give calibration data with --calib")
    return tuple(dims)


def _generate_one(model: ir.Model, value: ir.Value, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    dtype = numpy_dtype(value)
    if dtype is None:
        raise ActsparseError(f"input {value.name!r} has unknown dtype; give calibration data with --calib")
    if dtype.kind not in "biuf":
        raise ActsparseError(f"input {value.name!r} has dtype {value.dtype}; give calibration data with --calib")
    name = value.name.lower()
    if dtype == np.bool_:
        return np.ones(shape, dtype=dtype)
    if np.issubdtype(dtype, np.integer):
        if "mask" in name:
            return np.ones(shape, dtype=dtype)
        if "type" in name or "segment" in name:
            return np.zeros(shape, dtype=dtype)
        if "position" in name:
            return np.broadcast_to(np.arange(shape[-1], dtype=dtype), shape).copy()
        vocab = embedding_rows(model, value) or 100
        # Skip the lowest ids, which are mostly special tokens ([PAD], [CLS], ...).
        low = min(1000, vocab // 4)
        return rng.integers(low, vocab, size=shape, dtype=dtype)
    return rng.standard_normal(shape).astype(dtype)


def embedding_rows(model: ir.Model, value: ir.Value) -> int | None:
    """Vocabulary size: rows of the embedding table that a Gather indexes with this input."""
    for node, index in value.uses():
        if node.op_type == "Gather" and index == 1:
            table = node.inputs[0]
            if table is not None and table.const_value is not None and table.shape is not None:
                return int(table.shape[0])
        if node.op_type in ("Cast", "Reshape", "Unsqueeze", "Squeeze", "Identity", "Flatten"):
            found = embedding_rows(model, node.outputs[0])
            if found:
                return found
    return None
