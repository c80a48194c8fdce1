"""Run calibration samples through onnxruntime and collect intermediate values."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from actsparse.calibrate.data import Feeds
from actsparse.errors import ActsparseError
from actsparse.passes.verify import ort_session


def collect_values(model: ir.Model, names: list[str], samples: list[Feeds]) -> dict[str, list[np.ndarray]]:
    """Values named `names`, one array per sample. The model itself is not modified: a copy
    gets the values as extra graph outputs."""
    if not names:
        return {}
    probe = ir.serde.deserialize_model(ir.serde.serialize_model(model))
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
    for feeds in samples:
        results = dict(zip(output_names, session.run(None, feeds)))
        for name in wanted:
            collected[name].append(results[name])
    return collected


def as_rows(arrays: list[np.ndarray], channels: int) -> np.ndarray:
    """Stack samples as rows of `channels` features (tokens x channels)."""
    return np.concatenate([a.reshape(-1, channels) for a in arrays], axis=0)


def _all_values(graph: ir.Graph):
    yield from graph.inputs
    for node in graph:
        yield from node.outputs
