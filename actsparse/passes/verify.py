"""Checks run after every pass: onnx.checker + shape inference, and onnxruntime numerics."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir

from actsparse.errors import ActsparseError, VerificationError
from actsparse.ir.large import weightless_proto
from actsparse.ir.ort_session import ort_session


def check_model(model: ir.Model, after: str) -> None:
    # The weights stay out of the protobuf (typed graph inputs instead): a model above 2 GB cannot
    # be serialized, and the checks are about the graph.
    proto, _ = weightless_proto(model)
    try:
        onnx.checker.check_model(proto)
        onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=False)
    except Exception as exc:
        raise VerificationError(f"after pass {after!r}: invalid model ({str(exc).strip().splitlines()[0][:200]})") from None


def run_onnxruntime(model: ir.Model | object, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = model if hasattr(model, "run") else ort_session(model)
    try:
        return session.run(None, feeds)
    except Exception as exc:
        raise ActsparseError(f"onnxruntime failed to run the model: {str(exc).strip().splitlines()[0][:300]}") from None


@dataclass
class OutputComparison:
    """Accuracy of outputs against a reference, over all outputs and samples."""

    cosine: float          # mean over samples of the worst cosine among float outputs
    min_cosine: float
    max_abs_error: float
    max_rel_error: float   # max |a - b| / max(|b|), the scale-free form used for exact checks
    exact_match: bool      # integer/bool outputs identical

    def within(self, tolerance: float) -> bool:
        return self.exact_match and self.max_rel_error <= tolerance

    def to_json(self) -> dict:
        return {k: (round(v, 7) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def compare_outputs(reference: list[list[np.ndarray]], actual: list[list[np.ndarray]]) -> OutputComparison:
    cosines, max_abs, max_rel, exact = [], 0.0, 0.0, True
    for ref_outputs, act_outputs in zip(reference, actual):
        worst = 1.0
        for ref, act in zip(ref_outputs, act_outputs):
            ref, act = np.asarray(ref), np.asarray(act)
            if ref.shape != act.shape:
                raise VerificationError(f"output shape changed from {ref.shape} to {act.shape}")
            if not np.issubdtype(ref.dtype, np.floating):
                exact &= bool(np.array_equal(ref, act))
                continue
            ref64, act64 = ref.astype(np.float64).ravel(), act.astype(np.float64).ravel()
            if not (np.isfinite(act64).all() or not np.isfinite(ref64).all()):
                worst, max_abs, max_rel = -1.0, float("inf"), float("inf")
                continue
            diff = float(np.max(np.abs(ref64 - act64))) if ref64.size else 0.0
            scale = float(np.max(np.abs(ref64))) if ref64.size else 0.0
            max_abs = max(max_abs, diff)
            max_rel = max(max_rel, diff / scale if scale > 0 else diff)
            worst = min(worst, cosine_similarity(ref64, act64))
        cosines.append(worst)
    return OutputComparison(
        cosine=float(np.mean(cosines)) if cosines else 1.0,
        min_cosine=float(np.min(cosines)) if cosines else 1.0,
        max_abs_error=max_abs, max_rel_error=max_rel, exact_match=exact,
    )


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 and nb == 0:
        return 1.0
    if na == 0 or nb == 0:
        return 0.0
    return float(np.dot(a, b) / (na * nb))
