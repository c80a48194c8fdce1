"""What `actsparse deploy` compares a board's outputs with, and how closely.

The model an artifact computes is the *optimized* model (after its passes), which `compile`
holds only in memory. So compile packs what the check needs into the artifact itself:
onnxruntime's outputs of the optimized model on fixed inputs (``reference/inputs.npz``,
``reference/outputs.npz``, hashed and signed like every file), described in the manifest's
``report.reference``. Deploy, in this order of preference:

  1. --reference MODEL.onnx: that model's onnxruntime outputs on the inputs sent;
  2. the packed reference, when no --inputs/--seed asks for other inputs;
  3. the source model the artifact was compiled from, if it is still on this machine with the
     sha256 compile recorded (its passes' error allowed);
  4. nothing: the outputs are not compared, and the reason is printed.

Tolerance without --atol: 1e-4 against a model the artifact computes exactly; 3x the max abs
error the artifact's own accuracy report measured when the reference is the source model of
approximate passes; when its int8/int4 kernels skip the activation rounding of the graph (see
codegen/lowering/quant.py), 3x the error its quantize pass caused by itself (else the report's).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from actsparse.errors import ActsparseError

INPUTS_FILE = "reference/inputs.npz"
OUTPUTS_FILE = "reference/outputs.npz"
MAX_PACKED_BYTES = 16 << 20  # the reference travels with the artifact to the board: keep it small
EXACT_ATOL = 1e-4
REPORT_ERROR_FACTOR = 3
REFERENCE_SEED = 0


# ---------------------------------------------------------------- compile side


def pack_reference(optimized, input_specs: list[dict]) -> tuple[dict, dict[str, bytes]]:
    """(manifest section, files) holding the optimized model's onnxruntime outputs on seeded
    random inputs of the artifact's signature. When onnxruntime cannot run the model, the
    section says why and no files are packed (deploy then falls back to the source model)."""
    from actsparse import __version__
    from actsparse.ir.ort_session import ort_session
    from actsparse.runtime.run_command import artifact_inputs

    try:
        feeds = artifact_inputs(_Specs(input_specs), None, REFERENCE_SEED)
        if _nbytes(feeds) > MAX_PACKED_BYTES:
            return _missing(f"its inputs are larger than {MAX_PACKED_BYTES >> 20} MB"), {}
        import onnxruntime

        session = ort_session(optimized)
        names = [o.name for o in session.get_outputs()]
        outputs = dict(zip(names, session.run(None, feeds)))
    except Exception as exc:  # the artifact is still good; only its deploy check loses a reference
        return _missing(f"onnxruntime could not run it: {_first_line(exc)}"), {}
    if _nbytes(feeds) + _nbytes(outputs) > MAX_PACKED_BYTES:
        return _missing(f"its inputs and outputs are larger than {MAX_PACKED_BYTES >> 20} MB"), {}
    section = {"model": "optimized", "engine": f"onnxruntime {onnxruntime.__version__}",
               "actsparse": __version__, "inputs": INPUTS_FILE, "outputs": OUTPUTS_FILE}
    return section, {INPUTS_FILE: _npz_bytes(feeds), OUTPUTS_FILE: _npz_bytes(outputs)}


def _missing(why: str) -> dict:
    return {"model": "optimized", "missing": f"not packed: {why}"}


def _nbytes(arrays: dict[str, np.ndarray]) -> int:
    return sum(np.asarray(a).nbytes for a in arrays.values())


class _Specs:
    def __init__(self, specs: list[dict]):
        self.inputs = specs


def _npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__


# ---------------------------------------------------------------- deploy side


@dataclass
class Reference:
    """What the board's outputs are checked against: `outputs` (None: not compared, `described`
    says why), the `inputs` to send, and the tolerance with the reason for it."""

    inputs: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray] | None
    described: str
    atol: float
    why_atol: str = ""


def choose_reference(manifest: dict, packed: dict[str, bytes], *, reference: str | None, inputs: str | None,
                     seed: int | None, atol: float | None) -> Reference:
    """The deploy check's reference (see the module docstring for the order)."""
    report = manifest.get("report", {})
    section = report.get("reference") or {}
    if reference is not None:
        if not Path(reference).is_file():
            raise ActsparseError(f"--reference {reference}: no such file")
        feeds = _inputs(manifest, inputs, seed)
        tolerance = _tolerance(manifest, atol, against_source=_same_path(reference, report.get("source")))
        return Reference(feeds, onnx_outputs(reference, feeds), f"the model {reference} (--reference)", *tolerance)
    if inputs is None and seed is None and INPUTS_FILE in packed and OUTPUTS_FILE in packed:
        return Reference(_read_npz(packed[INPUTS_FILE]), _read_npz(packed[OUTPUTS_FILE]),
                         f"the optimized model the artifact was compiled from ({section.get('engine', 'onnxruntime')}"
                         " outputs packed at compile time)", *_tolerance(manifest, atol, against_source=False))
    feeds = _inputs(manifest, inputs, seed)
    why_not_packed = _why_not_packed(manifest, section, packed, inputs, seed)
    source, problem = _usable_source(report)
    if source is None:
        return Reference(feeds, None, f"nothing: {why_not_packed}; {problem} (give --reference model.onnx)",
                         EXACT_ATOL)
    note = f" ({why_not_packed})" if why_not_packed else ""
    return Reference(feeds, onnx_outputs(source, feeds), f"the source model {source}{note}",
                     *_tolerance(manifest, atol, against_source=True))


def _why_not_packed(manifest: dict, section: dict, packed: dict, inputs: str | None, seed: int | None) -> str:
    if not manifest.get("passes"):
        return ""  # no passes: the source model is the model the artifact computes
    if "missing" in section:
        return f"no packed reference of the optimized model: {section['missing']}"
    if INPUTS_FILE not in packed:
        return "the artifact packs no reference of the optimized model (compiled by an older actsparse)"
    return "the packed reference of the optimized model covers only the default inputs, not " + (
        f"--inputs {inputs}" if inputs is not None else f"--seed {seed}")


def _usable_source(report: dict) -> tuple[str | None, str]:
    """The source model if it is still the file compile read (same sha256), else (None, why)."""
    from actsparse.runtime.artifact import sha256_file

    source = report.get("source")
    if not source:
        return None, "the manifest names no source model"
    if not Path(source).is_file():
        return None, f"the source model {source} is not on this machine"
    recorded = report.get("source_sha256")
    if recorded and sha256_file(source) != recorded:
        return None, f"the source model {source} changed since compile (its sha256 differs)"
    return source, ""


def _tolerance(manifest: dict, atol: float | None, *, against_source: bool) -> tuple[float, str]:
    if atol is not None:
        return atol, ""
    report = manifest.get("report", {})
    measured = (report.get("accuracy_vs_original") or {}).get("max_abs_error")
    if not isinstance(measured, (int, float)) or measured <= 0:
        return EXACT_ATOL, ""
    if against_source and manifest.get("passes"):
        return max(EXACT_ATOL, REPORT_ERROR_FACTOR * float(measured)), \
            f": the passes' measured error {measured:.2e} x {REPORT_ERROR_FACTOR}"
    if _has_quantized_kernels(report):
        quantize_error = _quantize_error(manifest)
        what = "the quantize pass's" if quantize_error is not None else "the passes'"
        measured = measured if quantize_error is None else quantize_error
        return max(EXACT_ATOL, REPORT_ERROR_FACTOR * float(measured)), \
            (f": int8/int4 kernels skip the graph's activation rounding; {what} measured error "
             f"{measured:.2e} x {REPORT_ERROR_FACTOR}")
    return EXACT_ATOL, ""


def _quantize_error(manifest: dict) -> float | None:
    """The largest max abs error a quantize pass of this artifact caused by itself (vs the model
    before it): what skipping its activation rounding can change, without the other passes' error."""
    errors = [((entry.get("result") or {}).get("accuracy_vs_previous") or {}).get("max_abs_error")
              for entry in manifest.get("passes", []) if isinstance(entry, dict) and entry.get("name") == "quantize"]
    errors = [float(e) for e in errors if isinstance(e, (int, float)) and not isinstance(e, bool) and e >= 0]
    return max(errors) if errors else None


def _has_quantized_kernels(report: dict) -> bool:
    return any(str(layer.get("kernel", "")).startswith(("int8", "int4")) for layer in report.get("kernels", []))


def _same_path(a: str, b: str | None) -> bool:
    return b is not None and Path(a).resolve() == Path(b).resolve()


def _inputs(manifest: dict, inputs: str | None, seed: int | None) -> dict[str, np.ndarray]:
    from actsparse.runtime.run_command import artifact_inputs

    return artifact_inputs(_Specs(manifest["inputs"]), inputs, REFERENCE_SEED if seed is None else seed)


def _read_npz(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
        return {name: arrays[name] for name in arrays.files}


def onnx_outputs(onnx_path: str, feeds: dict) -> dict[str, np.ndarray]:
    """onnxruntime's outputs of the ONNX model at `onnx_path` on `feeds` (extra feeds ignored)."""
    from actsparse.frontend.onnx_file import load_model
    from actsparse.ir.ort_session import ort_session

    session = ort_session(load_model(onnx_path))
    names = [o.name for o in session.get_outputs()]
    wanted = {i.name for i in session.get_inputs()}
    return dict(zip(names, session.run(None, {k: v for k, v in feeds.items() if k in wanted})))
