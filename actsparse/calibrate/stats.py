"""Run calibration samples through onnxruntime and collect intermediate values."""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx_ir as ir

from actsparse.calibrate.data import Feeds
from actsparse.errors import ActsparseError
from actsparse.ir.large import copy_model
from actsparse.ir.ort_session import ort_session


def collect_values(model: ir.Model, names: list[str], samples: list[Feeds],
                   on_sample: Callable[[int, int], None] | None = None) -> dict[str, list[np.ndarray]]:
    """Values named `names`, one array per sample. The model itself is not modified: a copy
    gets the values as extra graph outputs. `on_sample(done, total)` after each sample."""
    if not names:
        return {}
    probe = copy_model(model)  # shares the tensors: no weight is copied or serialized
    values = {v.name: v for v in _all_values(probe.graph)}
    existing = {v.name for v in probe.graph.outputs}
    wanted = []
    for name in dict.fromkeys(names):
        if name not in values:
            raise ActsparseError(f"value {name!r} not found in the model")
        if name not in existing:
            probe.graph.outputs.append(values[name])
        wanted.append(name)
    session = ort_session(probe)
    output_names = [o.name for o in session.get_outputs()]
    collected: dict[str, list[np.ndarray]] = {name: [] for name in wanted}
    for index, feeds in enumerate(samples):
        results = dict(zip(output_names, session.run(None, feeds)))
        for name in wanted:
            collected[name].append(results[name])
        if on_sample is not None:
            on_sample(index + 1, len(samples))
    return collected


def as_rows(arrays: list[np.ndarray], channels: int, masks: list[np.ndarray] | None = None) -> np.ndarray:
    """Stack samples as rows of `channels` features (tokens x channels). With `masks`
    (one per sample, e.g. the attention mask), rows of padding tokens are left out."""
    rows = []
    for index, array in enumerate(arrays):
        mask = masks[index] if masks is not None else None
        if mask is not None and array.shape[:-1] == mask.shape and array.shape[-1] == channels:
            rows.append(array[mask.astype(bool)])
        else:
            rows.append(array.reshape(-1, channels))
    return np.concatenate(rows, axis=0)


def token_masks(samples: list[dict[str, np.ndarray]]) -> list[np.ndarray] | None:
    """The attention mask of each sample, if the model takes one (padding tokens are 0)."""
    names = [name for name, array in samples[0].items()
             if "attention_mask" in name.lower() and (np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_)]
    if len(names) != 1:
        return None
    return [sample[names[0]] != 0 for sample in samples]


def _all_values(graph: ir.Graph):
    yield from graph.inputs
    for node in graph:
        yield from node.outputs
