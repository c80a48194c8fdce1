"""The few functions users call. Thin: they glue frontends, passes and codegen together."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import onnx
import onnx_ir as ir

from actsparse.errors import ActsparseError
from actsparse.passes.base import PassContext
from actsparse.passes.pipeline import PassRecord, PassSpec, load_recipe, parse_pipeline, run_pipeline

PassesArg = str | Iterable[str | PassSpec | tuple[str, dict]] | None


@dataclass
class OptimizeResult:
    model: ir.Model
    records: list[PassRecord]

    def save(self, path: str | os.PathLike, *, source: str | os.PathLike | None = None) -> Path:
        from actsparse.frontend.onnx_file import save_model

        save_model(self.model, path, source=source)
        return Path(path)

    def to_onnx(self) -> onnx.ModelProto:
        return ir.serde.serialize_model(self.model)

    def report(self) -> dict[str, Any]:
        from actsparse import __version__

        return {"actsparse_version": __version__, "passes": [r.to_json() for r in self.records]}


def to_ir_model(model: Any, example_inputs: Any = None) -> ir.Model:
    """Accept an ONNX path, onnx.ModelProto, ir.Model, or torch.nn.Module (+ example inputs)."""
    from actsparse.frontend.onnx_file import load_model

    if isinstance(model, ir.Model):
        return model
    if isinstance(model, onnx.ModelProto):
        return ir.serde.deserialize_model(model)
    if isinstance(model, (str, os.PathLike)):
        return load_model(model)
    if _is_torch_module(model):
        if example_inputs is None:
            raise ActsparseError("a torch model needs example_inputs to be exported")
        from actsparse.frontend.torch_export import export_torch

        return export_torch(model, example_inputs)
    raise ActsparseError(f"cannot read a model from {type(model).__name__}; give an ONNX path, ModelProto or torch.nn.Module")


def resolve_passes(passes: PassesArg = None, recipe: str | os.PathLike | None = None) -> list[PassSpec]:
    if recipe is not None and passes:
        raise ActsparseError("give either passes or a recipe, not both")
    if recipe is not None:
        return load_recipe(recipe)
    if passes is None or passes == "":
        return [PassSpec("cleanup")]
    if isinstance(passes, str):
        return parse_pipeline(passes)
    specs = []
    for item in passes:
        if isinstance(item, PassSpec):
            specs.append(item)
        elif isinstance(item, str):
            specs.extend(parse_pipeline(item))
        else:
            name, options = item
            specs.append(PassSpec(name, dict(options)))
    return specs


def calibration_for(model: ir.Model, calib: Any = None, *, samples: int = 8, seed: int = 0,
                    sequence_length: int = 16) -> list[dict[str, np.ndarray]]:
    """Calibration feeds from an .npz path, a dict of arrays, a list of feeds, or generated."""
    from actsparse.calibrate.data import feeds_from_arrays, generate_calibration, load_calibration

    if calib is None:
        return generate_calibration(model, samples, sequence_length=sequence_length, seed=seed)
    if isinstance(calib, (str, os.PathLike)):
        return load_calibration(calib, model)
    if isinstance(calib, dict):
        return feeds_from_arrays({k: np.asarray(v) for k, v in calib.items()}, model)
    return [{k: np.asarray(v) for k, v in feeds.items()} for feeds in calib]


def optimize(model: Any, example_inputs: Any = None, passes: PassesArg = None, *, recipe=None, calib=None,
             verify: bool = True, seed: int = 0, on_pass=None) -> OptimizeResult:
    """Run a pass pipeline on a model; every pass is verified (onnx.checker + onnxruntime).

    >>> result = actsparse.optimize("model.onnx", passes="relufy,sparsify{method=teal,sparsity=0.5}")
    >>> result.save("out.onnx")
    """
    specs = resolve_passes(passes, recipe)
    ir_model = to_ir_model(model, example_inputs)
    context = PassContext(calibration=calibration_for(ir_model, calib, seed=seed), seed=seed)
    ir_model, records = run_pipeline(ir_model, specs, context, verify=verify, on_pass=on_pass)
    return OptimizeResult(ir_model, records)


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    import tempfile

    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent if str(path.parent) else ".")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, default=_json_default)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _json_default(value: Any):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


def _is_torch_module(obj: Any) -> bool:
    torch = __import__("sys").modules.get("torch")
    return torch is not None and isinstance(obj, torch.nn.Module)
