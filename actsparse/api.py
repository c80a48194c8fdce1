"""The few functions users call: `optimize`, `compile` (and `actsparse.load`, from the runtime).

Thin: they glue frontends, passes and codegen together. The `actsparse` command calls these
same functions; the calibration defaults both use are written here once.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import onnx
import onnx_ir as ir

from actsparse.atomic import write_json_atomic  # noqa: F401 (part of the API, used by the CLI)
from actsparse.errors import ActsparseError
from actsparse.passes.base import PassContext
from actsparse.passes.pipeline import PassRecord, PassSpec, load_recipe, parse_pipeline, run_pipeline

PassesArg = str | Iterable[str | PassSpec | tuple[str, dict]] | None

# Generated calibration (when no data is given): samples, their sequence length, the seed.
CALIBRATION_SAMPLES = 8
CALIBRATION_SEQUENCE_LENGTH = 16
CALIBRATION_SEED = 0


@dataclass
class OptimizeResult:
    """What `optimize` returns: the optimized model and one record per pass run."""

    model: ir.Model
    records: list[PassRecord]

    def save(self, path: str | os.PathLike, *, source: str | os.PathLike | None = None) -> Path:
        """Write the model to `path` (a temp file and a rename; large tensors to `path`.data).

        Args:
            path: the ONNX file to write.
            source: the input model's file: writing over it is refused.

        Returns:
            `path`, as a Path.

        Raises:
            ActsparseError: `path` is `source`, a directory, or in a folder that does not exist.
        """
        from actsparse.frontend.onnx_file import save_model

        save_model(self.model, path, source=source)
        return Path(path)

    def to_onnx(self) -> onnx.ModelProto:
        """The model as an onnx.ModelProto (serialized whole: for models under 2 GB)."""
        return ir.serde.serialize_model(self.model)

    def report(self) -> dict[str, Any]:
        """The passes, their options and results as JSON data; `recipe=` replays it."""
        from actsparse import __version__

        return {"actsparse_version": __version__, "passes": [r.to_json() for r in self.records]}


def to_ir_model(model: Any, example_inputs: Any = None) -> ir.Model:
    """Accept an ONNX path, onnx.ModelProto, ir.Model, or torch.nn.Module (+ example inputs)."""
    from actsparse.frontend.onnx_file import load_model

    if isinstance(model, ir.Model):  # passes work in place: never change the caller's model
        from actsparse.ir.large import copy_model

        return copy_model(model)  # shares the tensors (never changed in place), keeps external data's folder
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


def for_compile(specs: list[PassSpec]) -> list[PassSpec]:
    """`specs` for a compile: quantize's onnxruntime speed check off unless asked for. The compiled
    artifact runs actsparse's kernels, not onnxruntime's, so that check only cost time (two
    sessions of the model) and warned of a slowdown the artifact does not have."""
    return [PassSpec(spec.name, {"speed_check": False} | spec.options) if spec.name == "quantize" else spec
            for spec in specs]


def resolve_passes(passes: PassesArg = None, recipe: str | os.PathLike | None = None) -> list[PassSpec]:
    """The pass pipeline from `passes` (a pipeline string, or names, specs and (name, options)
    pairs) or from a `recipe` file; `cleanup` alone when neither is given."""
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


def calibration_for(model: ir.Model, calib: Any = None, *, samples: int = CALIBRATION_SAMPLES,
                    seed: int = CALIBRATION_SEED, sequence_length: int = CALIBRATION_SEQUENCE_LENGTH,
                    calib_text: str | os.PathLike | None = None,
                    tokenizer: str | os.PathLike | None = None) -> list[dict[str, np.ndarray]]:
    """Calibration feeds from an .npz path, a dict of arrays, a list of feeds, text (`calib_text`,
    one sample per line, tokenized by the Hugging Face `tokenizer` folder), or generated."""
    from actsparse.calibrate.data import feeds_from_arrays, generate_calibration, load_calibration

    if calib_text is not None or tokenizer is not None:
        if calib_text is None or tokenizer is None or calib is not None:
            raise ActsparseError("calib_text needs tokenizer, and neither goes with calib")
        from actsparse.calibrate.text import text_calibration

        return text_calibration(model, calib_text, tokenizer, num_samples=samples, sequence_length=sequence_length)
    if calib is None:
        return generate_calibration(model, samples, sequence_length=sequence_length, seed=seed)
    if isinstance(calib, (str, os.PathLike)):
        return load_calibration(calib, model)
    if isinstance(calib, dict):
        return feeds_from_arrays({k: np.asarray(v) for k, v in calib.items()}, model)
    samples = [sample for feeds in calib for sample in  # each feed checked like an .npz sample
               feeds_from_arrays({k: np.asarray(v) for k, v in feeds.items()}, model)]
    if not samples:
        raise ActsparseError("calibration: no samples")
    return samples


def calibration_settings(recipe: str | os.PathLike | None = None, **given: Any) -> dict[str, Any]:
    """A run's calibration settings, under the names a report records them: samples, seq_len,
    seed, calib, calib_text, tokenizer. Each one given (not None) wins, then the one the replayed
    report `recipe` recorded, then the default (None for calib, calib_text and tokenizer)."""
    recorded = _recorded_calibration(recipe) if recipe else {}
    defaults = {"samples": CALIBRATION_SAMPLES, "seq_len": CALIBRATION_SEQUENCE_LENGTH, "seed": CALIBRATION_SEED}
    settings = {}
    for key, default in defaults.items():
        value = given.get(key)
        if value is None:
            value = recorded.get(key, default)
            value = value if isinstance(value, int) and not isinstance(value, bool) else default
        settings[key] = value
    for key in ("calib", "calib_text", "tokenizer"):
        value = given.get(key)
        settings[key] = value if value is not None else (recorded[key] if isinstance(recorded.get(key), str) else None)
    return settings


def _recorded_calibration(recipe: str | os.PathLike) -> dict[str, Any]:
    """The calibration block of a report file; empty for any other recipe (or an unreadable one:
    `resolve_passes` says what is wrong with it)."""
    import yaml

    try:
        data = yaml.safe_load(Path(recipe).read_text())
    except Exception:
        return {}
    recorded = data.get("calibration") if isinstance(data, dict) else None
    return recorded if isinstance(recorded, dict) else {}


def optimize(model: Any, example_inputs: Any = None, passes: PassesArg = None, *, recipe=None, calib=None,
             calib_text: str | os.PathLike | None = None, tokenizer: str | os.PathLike | None = None,
             samples: int = CALIBRATION_SAMPLES, sequence_length: int = CALIBRATION_SEQUENCE_LENGTH,
             verify: bool = True, seed: int = CALIBRATION_SEED, on_pass=None, on_sample=None) -> OptimizeResult:
    """Run a pass pipeline on a model; every pass is verified (onnx.checker + onnxruntime).

    >>> result = actsparse.optimize("model.onnx", passes="relufy,sparsify{method=teal,sparsity=0.5}")
    >>> result.save("out.onnx")

    Args:
        model: an ONNX path, onnx.ModelProto, onnx_ir Model (not changed: the passes work on a
            copy) or torch.nn.Module (exported with `example_inputs`).
        example_inputs: a torch model's inputs (tuple in input order, or dict by name).
        passes: a pipeline string ("relufy,sparsify{method=teal,sparsity=0.5}"), or a list of
            pass names, PassSpecs and (name, options) pairs. Default: `cleanup` alone.
        recipe: instead of `passes`, a YAML/JSON recipe or an earlier `report()` saved as JSON.
        calib: calibration data: an .npz path, a dict of arrays by input name, or a list of such
            dicts. Default: `samples` random inputs of `sequence_length` from the input signature.
        calib_text: a text file, one calibration sample per line (needs `tokenizer`, not `calib`).
        tokenizer: the Hugging Face tokenizer folder for `calib_text`.
        samples: generated (or text) calibration samples (default 8).
        sequence_length: the length of generated (or text) inputs' dynamic dimensions (default 16).
        verify: check each pass's model with onnx.checker and onnxruntime (default True).
        seed: seeds the generated calibration data and the passes' own sampling (default 0).
        on_pass: `on_pass(index, total, name)`, called before each pass.
        on_sample: `on_sample(done, total)`, called after each calibration sample a pass runs.

    Returns:
        An OptimizeResult: the model, one PassRecord per pass (options, report, measured error),
        `save(path)` and `report()`.

    Raises:
        ActsparseError: an unreadable model, an unknown pass or option, bad calibration data, or
            (VerificationError) a pass whose model fails verification.
    """
    specs = resolve_passes(passes, recipe)
    ir_model = to_ir_model(model, example_inputs)
    feeds = calibration_for(ir_model, calib, samples=samples, seed=seed, sequence_length=sequence_length,
                            calib_text=calib_text, tokenizer=tokenizer)
    context = PassContext(calibration=feeds, seed=seed, on_sample=on_sample)
    ir_model, records = run_pipeline(ir_model, specs, context, verify=verify, on_pass=on_pass)
    record_accuracy(ir_model, records)
    return OptimizeResult(ir_model, records)


@dataclass
class CompiledArtifact:
    """A compiled artifact on disk. `run()` loads it (once) with the thin runtime."""

    path: Path
    target: dict
    kernels: list[dict]
    records: list[PassRecord]
    seconds: dict[str, float]

    def load(self, device: str | None = None):
        """The artifact loaded with the thin runtime: a CompiledModel (a LanguageModel for a
        causal LM). `device`: as for `actsparse.load` (default: the artifact's target)."""
        from actsparse.runtime import load

        return load(self.path, device)

    def run(self, *args, **named) -> dict[str, np.ndarray]:
        """Run the artifact (loaded on the first call): see CompiledModel.run."""
        if getattr(self, "_loaded", None) is None:
            self._loaded = self.load()
        return self._loaded.run(*args, **named)


def compile(model: Any, target: str = "host", passes: PassesArg = None, *, example_inputs: Any = None,
            output: str | os.PathLike | None = None, recipe=None, calib=None, verify: bool = True,
            seed: int = CALIBRATION_SEED, bundle_runtime: bool | str = False, on_pass=None, on_step=None,
            on_sample=None, on_optimized=None, input_shapes: dict[str, tuple[int, ...]] | None = None,
            samples: int | None = None, sequence_length: int = CALIBRATION_SEQUENCE_LENGTH,
            max_context: int | None = None,
            calib_text: str | os.PathLike | None = None, tokenizer: str | os.PathLike | None = None,
            kv_cache: str | None = None) -> CompiledArtifact:
    """Optimize (optional passes) and compile a model for `target` into an artifact.

    >>> art = actsparse.compile("model.onnx", target="host", passes="sparsify{method=teal,sparsity=0.5}",
    ...                         example_inputs={"x": np.zeros((1, 1024), np.float32)}, output="m.actsparse")
    >>> y = art.run(x=...)   # or actsparse.load("m.actsparse").run(...)

    A causal LM (a transformers module, or a Hugging Face / actsparse.lm folder) given without
    example inputs compiles for generation instead (docs/generation.md): its one-token decode step
    over a KV cache of `max_context` tokens, thresholds calibrated on decode steps of `calib_text`;
    `actsparse.load` then returns a LanguageModel with `generate()`. With passes, an ONNX model's
    artifact packs the optimized model's onnxruntime outputs on fixed inputs, which
    `actsparse deploy` checks a board against (actsparse.deploy.reference).

    Args:
        model: as for `optimize`, or a causal LM (transformers module, or model folder).
        target: "host" (default), "x86", "rpi4", "aarch64", "cuda[:sm_XX]", or a JSON target.
        passes: as for `optimize`; default: none (the model compiles as it is).
        example_inputs: inputs (tuple in input order, or dict by name; numpy or torch): a torch
            model's export inputs, the static input shapes, and the calibration when `calib` is None.
        output: the artifact path (a directory, or a .tar file); default: a new temp folder.
        recipe, calib, calib_text, tokenizer, verify, seed, on_pass, on_sample: as for `optimize`;
            for a causal LM, `calib_text` is text whose decode steps calibrate, and `tokenizer` the
            tokenizer.json to pack (default: the model folder's) or "bytes".
        bundle_runtime: True puts this machine's libtvm_runtime.so in the artifact; a path, that file.
        on_step: `on_step(message)`, called at each compile step.
        on_optimized: ONNX models: `on_optimized(records)`, called once the passes have run and
            before compiling starts (not called without passes).
        input_shapes: static shapes by input name (e.g. {"input_ids": (1, 128)}), used as given;
            default: the shapes of `example_inputs`, else of the first calibration sample.
        samples: generated (or text) calibration samples (default 8); for a causal LM, decode
            steps calibrated on (default 64).
        sequence_length: ONNX models: the dynamic dimensions of generated inputs (default 16).
        max_context: causal LMs: tokens the KV cache holds (default 2048, capped by the model's positions).
        kv_cache: causal LMs: the cache's element type, "float32" (default) or "float16".

    Returns:
        A CompiledArtifact: its path, target, the kernel chosen per linear layer, the pass records
        and the seconds each step took; `run()` runs it.

    Raises:
        ActsparseError: as for `optimize`; an unknown target; an op the target cannot compile;
            causal-LM options for another model.
    """
    import tempfile

    from actsparse.codegen.compile import compile_model
    from actsparse.frontend.causal_lm import is_causal_lm

    if example_inputs is None and is_causal_lm(model):
        from actsparse.lm.compile import compile_causal_lm

        if calib is not None:
            raise ActsparseError("a causal LM is calibrated on decode steps: give calib_text, not calib")
        if input_shapes is not None:
            raise ActsparseError("a causal LM's decode step has fixed input shapes: no input_shapes")
        steps = {} if samples is None else {"calibration_steps": samples}
        return compile_causal_lm(model, target, passes, output=output, max_context=max_context,
                                 calib_text=calib_text, tokenizer=tokenizer, recipe=recipe, verify=verify, seed=seed,
                                 bundle_runtime=bundle_runtime, on_pass=on_pass, on_step=on_step,
                                 kv_cache=kv_cache or "float32", on_sample=on_sample, **steps)
    if max_context is not None or kv_cache is not None:
        raise ActsparseError("max_context and kv_cache are for causal LMs (a transformers causal-LM module or "
                             "folder, without example_inputs)")

    ir_model = to_ir_model(model, example_inputs)
    shapes = dict(input_shapes) if input_shapes is not None else input_shapes_of(ir_model, example_inputs)
    records: list[PassRecord] = []
    specs = for_compile(resolve_passes(passes, recipe)) if (passes or recipe) else []
    if specs:
        given = calib is not None or calib_text is not None or tokenizer is not None
        examples = [feeds_of(ir_model, example_inputs)] if example_inputs is not None and not given else None
        feeds = calibration_for(ir_model, calib if calib is not None else examples, seed=seed,
                                samples=CALIBRATION_SAMPLES if samples is None else samples,
                                sequence_length=sequence_length, calib_text=calib_text, tokenizer=tokenizer)
        ir_model, records = run_pipeline(ir_model, specs, PassContext(calibration=feeds, seed=seed, on_sample=on_sample),
                                         verify=verify, on_pass=on_pass)
        if on_optimized is not None:
            on_optimized(records)
        if not shapes and input_shapes is None:
            shapes = {name: array.shape for name, array in feeds[0].items()}
    if output is None:
        output = Path(tempfile.mkdtemp(prefix="actsparse-")) / "model.actsparse"
    from actsparse.ir.large import copy_model

    result = compile_model(ir_model, target, output, input_shapes=shapes, passes=[r.to_json() for r in records],
                           report=source_report(model) | accuracy_report(ir_model, records), bundle_runtime=bundle_runtime,
                           on_step=on_step, copy=False,  # ir_model is ours: to_ir_model copied or loaded it
                           reference_model=copy_model(ir_model) if records else None)
    return CompiledArtifact(result.path, result.target, result.kernels, records, result.seconds)


def feeds_of(model: ir.Model, example_inputs: Any) -> dict[str, np.ndarray]:
    """Example inputs (tuple in input order, or dict by name; numpy or torch) as named arrays."""
    from actsparse.calibrate.data import model_inputs

    names = [v.name for v in model_inputs(model)]
    if isinstance(example_inputs, dict):
        items = example_inputs.items()
    else:
        values = example_inputs if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
        if len(values) != len(names):
            raise ActsparseError(f"{len(values)} example inputs for a model with inputs {names}")
        items = zip(names, values)
    feeds = {}
    for name, value in items:
        if name not in names:
            raise ActsparseError(f"example input {name!r} is not a model input {names}")
        feeds[name] = _to_numpy(value)
    return feeds


def input_shapes_of(model: ir.Model, example_inputs: Any) -> dict[str, tuple[int, ...]]:
    if example_inputs is None:
        return {}
    return {name: array.shape for name, array in feeds_of(model, example_inputs).items()}


def _to_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # torch tensor
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _accuracy_report(records: list[PassRecord]) -> dict[str, Any]:
    """The manifest's accuracy report: the last measured error of the passes vs the input model."""
    last = next((r for r in reversed(records) if r.vs_original is not None), None)
    return {"accuracy_vs_original": last.vs_original.to_json()} if last else {}


ACCURACY_METADATA_KEY = "actsparse.accuracy_vs_original"


def accuracy_report(model: ir.Model, records: list[PassRecord]) -> dict[str, Any]:
    """The accuracy report of `model` after `records`, counted from the model before any actsparse
    pass: an optimized ONNX records its passes' error in its metadata (`record_accuracy`), so that
    `compile` of it without passes (or more passes on it) still knows how far it is from the
    original. Chained, the max abs errors add up (a bound), and each run's own figures are kept."""
    current = _accuracy_report(records).get("accuracy_vs_original")
    earlier = _recorded_accuracy(model)
    if current is None or earlier is None:
        report = current or earlier
        return {"accuracy_vs_original": report} if report else {}
    return {"accuracy_vs_original": {"max_abs_error": earlier["max_abs_error"] + current["max_abs_error"],
                                     "max_abs_error_is_bound": True,
                                     "runs": earlier.get("runs", [earlier]) + [current]}}


def record_accuracy(model: ir.Model, records: list[PassRecord]) -> None:
    """Write the model's accuracy report (`accuracy_report`) into its ONNX metadata."""
    report = accuracy_report(model, records)
    if report:
        model.metadata_props[ACCURACY_METADATA_KEY] = json.dumps(report["accuracy_vs_original"])


def _recorded_accuracy(model: ir.Model) -> dict[str, Any] | None:
    """The accuracy an earlier `optimize` recorded in the model, if it is well formed."""
    try:
        recorded = json.loads(model.metadata_props.get(ACCURACY_METADATA_KEY, "null"))
    except ValueError:
        return None
    error = recorded.get("max_abs_error") if isinstance(recorded, dict) else None
    if isinstance(error, bool) or not isinstance(error, (int, float)) or not 0 <= error < float("inf"):
        return None
    return recorded


def source_report(model: Any) -> dict[str, Any]:
    """The source model file and its sha256 (deploy and bench use it only while it is unchanged)."""
    if not isinstance(model, (str, os.PathLike)) or not Path(model).is_file():
        return {}
    from actsparse.runtime.artifact import sha256_file

    return {"source": str(Path(model).resolve()), "source_sha256": sha256_file(model)}


def _is_torch_module(obj: Any) -> bool:
    torch = __import__("sys").modules.get("torch")
    return torch is not None and isinstance(obj, torch.nn.Module)
