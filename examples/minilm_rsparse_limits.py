"""What limits R-Sparse on all-MiniLM-L6-v2's FFN inputs (the protocol of minilm_sparsity.py).

Prints, and writes to examples/results/minilm_rsparse_limits.json:
  1. per FFN linear at 50 %: the closed-form relative output error of all rows (WINA-like), of
     all rank, and of the best split; the share of W's energy in the rank the budget buys;
     the model-output error of that linear alone, and of all of them at 30-50 % (calibration sentences);
  2. the sentence-embedding cosine of uniform R-Sparse and TEAL on the FFN inputs from 30 to 50 %,
     to see at which sparsity 0.975 is reached.

    python examples/minilm_rsparse_limits.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import minilm_sparsity as protocol  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "minilm_rsparse_limits.json"
SPARSITIES = (0.3, 0.35, 0.4, 0.45, 0.5)


def per_linear(model, calibration, sparsity: float = 0.5) -> list[dict]:
    import actsparse.passes  # noqa: F401
    from actsparse.calibrate.stats import as_rows, collect_values, token_masks
    from actsparse.passes.rsparse import _calibration_rows, linears_in_scope
    from actsparse.passes.rsparse_allocation import KEPT_FRACTIONS, ModelProbe, linear_curve

    linears = [l for l in linears_in_scope(model, "ffn") if l.plain_product]
    values = collect_values(model, list(dict.fromkeys(l.input.name for l in linears)), calibration)
    masks = token_masks(calibration)
    curves = []
    for l in linears:
        rows = _calibration_rows(as_rows(values[l.input.name], l.in_features, masks))
        curves.append(linear_curve(l.name, rows, l.weight_array("KN").astype(np.float64)))
    probe = ModelProbe(model, "ffn", curves, calibration[:8])
    out = []
    for index, curve in enumerate(curves):
        budget = 1 - sparsity
        all_rows = curve.tails[np.argmin(np.abs(KEPT_FRACTIONS - budget)), 0]
        all_rank = curve.rank_for(budget)
        best = curve.split(sparsity)
        singular = np.sum(curve.lowrank_in ** 2, axis=0)  # σ_j² (U has orthonormal columns)
        out.append({"linear": curve.name, "kind": "intermediate (in)" if index % 2 == 0 else "output (out)",
                    "shape": [curve.k, curve.n], "error_all_rows": round(float(all_rows), 5),
                    "error_all_rank": round(float(curve.tails[0, all_rank]), 5), "rank_all_rank": all_rank,
                    "energy_in_that_rank": round(float(np.sum(singular[:all_rank]) / np.sum(singular)), 4),
                    "error_best_split": round(best.error, 5), "best_kept_fraction": round(best.sparse_ratio * budget, 3),
                    "best_rank": best.rank, "model_error_alone": round(probe.alone(curve, sparsity), 5)})
    for level in SPARSITIES:  # the calibration error that goes with each cosine of the uniform curve
        out.append({"linear": "all FFN linears together", "sparsity": level,
                    "model_error": round(probe.error({c.name: level for c in curves}), 5)})
    return out


def cosine_curve(onnx_path, calibration, evaluation, reference) -> list[dict]:
    import actsparse
    from actsparse.frontend.onnx_file import load_model

    rows = []
    for method in ("teal", "rsparse"):
        for sparsity in SPARSITIES:
            result = actsparse.optimize(load_model(onnx_path), calib=calibration, verify=False,
                                        passes=[protocol.pass_spec(method, sparsity, "ffn", "uniform")])
            cosine = float(np.mean(np.sum(protocol.embed(result.model, evaluation) * reference, axis=1)))
            rows.append({"method": method, "sparsity": sparsity, "cosine": round(cosine, 4)})
            print(f"{method} FFN {sparsity:.0%}: cosine {cosine:.4f}", file=sys.stderr)
    return rows


def main() -> int:
    from actsparse.frontend.onnx_file import load_model

    onnx_path = Path.home() / ".cache" / "actsparse" / f"all-MiniLM-L6-v2-seq{protocol.SEQ_LEN}.onnx"
    if not onnx_path.exists():
        protocol.export_minilm(onnx_path)
    calibration = protocol.tokenize(protocol.CALIBRATION_SENTENCES)
    evaluation = protocol.tokenize(protocol.EVAL_SENTENCES)
    reference = protocol.embed(load_model(onnx_path), evaluation)
    result = {"per_linear_at_50": per_linear(load_model(onnx_path), calibration),
              "ffn_cosine": cosine_curve(onnx_path, calibration, evaluation, reference)}
    RESULTS.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
