"""PPL-p%: the highest activation sparsity each method reaches while perplexity rises <= p %.

For a causal LM in ONNX (input `input_ids` [1, L], output logits [1, L, V]) and held-out
token windows, each method (teal, wina, cats, chess) is applied at a grid of sparsity levels
on a fresh copy of the model, perplexity is measured through onnxruntime, and the highest
level within the tolerance is refined by bisection between the last grid level that passed
and the first that failed. The result holds every curve point; `plot_curves` draws sparsity
against perplexity.

    python -m actsparse.lm.perplexity model.onnx --ppl-tolerance 1% [--methods teal,wina,chess]
        [--levels 0.1,0.2,...] [--out DIR]   (held-out stdlib text, byte tokens, by default)

Methods, all on the FFN blocks (the part a sparse FFN kernel skips):
teal = sparsify{method=teal,scope=ffn} (|x| on the inputs of gate/up and of down),
wina = sparsify{method=wina,scope=ffn} (|x| * weight-row norm), cats = sparsify{method=cats}
(one threshold on |act(gate)|), chess = chess (one threshold per channel of act(gate)),
rsparse = rsparse{scope=ffn} (R-Sparse: `sparsity` is the fraction of the FFN weight bytes not read,
TEAL's meaning; kept rows + the SVD of W), rsparse-act = the same with basis=activation.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import onnx_ir as ir

from actsparse.errors import ActsparseError

METHODS = ("teal", "wina", "cats", "chess", "rsparse", "rsparse-act", "rsparse-greedy", "rsparse-evolutionary")
DEFAULT_LEVELS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
BISECTION_STEPS = 3


def method_pass(method: str, sparsity: float) -> tuple[str, dict]:
    """The pass (name, options) that applies `method` at `sparsity`."""
    if method in ("teal", "wina"):
        return "sparsify", {"method": method, "scope": "ffn", "sparsity": sparsity}
    if method == "cats":
        return "sparsify", {"method": "cats", "sparsity": sparsity}
    if method == "chess":
        return "chess", {"sparsity": sparsity}
    if method == "rsparse":
        return "rsparse", {"scope": "ffn", "sparsity": sparsity}
    if method == "rsparse-act":
        return "rsparse", {"scope": "ffn", "sparsity": sparsity, "basis": "activation"}
    if method in ("rsparse-greedy", "rsparse-evolutionary"):  # per-linear sparsity at the same bytes
        return "rsparse", {"scope": "ffn", "sparsity": sparsity, "allocation": method.split("-")[1]}
    raise ActsparseError(f"unknown method {method!r}; methods: {', '.join(METHODS)}")


def windows_as_samples(windows: np.ndarray) -> list[dict[str, np.ndarray]]:
    """[n, L + 1] token windows -> calibration feeds {'input_ids': [1, L]}."""
    return [{"input_ids": w[None, :-1].astype(np.int64)} for w in windows]


def onnx_perplexity(model: ir.Model, windows: np.ndarray) -> float:
    """exp(mean next-token cross-entropy) of an ONNX causal LM over `windows` ([n, L + 1])."""
    from actsparse.ir.ort_session import ort_session

    session = ort_session(model)
    input_name = session.get_inputs()[0].name
    total, count = 0.0, 0
    for window in windows:
        logits = session.run(None, {input_name: window[None, :-1].astype(np.int64)})[0][0].astype(np.float64)
        if logits.ndim != 2:
            raise ActsparseError(f"expected logits [1, L, vocab] from the model, got {list(logits.shape)}")
        logits -= logits.max(-1, keepdims=True)
        log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        targets = window[1:]
        total -= float(log_probs[np.arange(len(targets)), targets].sum())
        count += len(targets)
    return math.exp(total / count)


def sparsified(model: ir.Model, method: str, sparsity: float, calibration) -> tuple[ir.Model, dict]:
    """A copy of `model` with `method` applied at `sparsity`, and the pass's report."""
    from actsparse.passes import PassContext, make_pass

    from actsparse.ir.large import copy_model

    copy = copy_model(model)  # shares the tensors (passes replace them, never change them)
    if sparsity <= 0:
        return copy, {}
    name, options = method_pass(method, sparsity)
    pass_ = make_pass(name, options, PassContext(calibration=calibration))
    return pass_(copy).model, pass_.report


def ppl_tolerance(model: ir.Model, calibration, windows: np.ndarray, *, tolerance: float = 0.01,
                  methods=("teal", "wina", "chess"), levels=DEFAULT_LEVELS, progress=None) -> dict:
    """Per method: perplexity at each level, and the highest sparsity with
    perplexity <= (1 + tolerance) * baseline (grid, then bisection)."""
    if tolerance <= 0:
        raise ActsparseError(f"perplexity tolerance must be > 0, got {tolerance}")
    baseline = onnx_perplexity(model, windows)
    limit = baseline * (1 + tolerance)
    result = {"baseline_perplexity": round(baseline, 5), "tolerance": tolerance, "limit": round(limit, 5),
              "windows": int(len(windows)), "tokens": int(windows[:, 1:].size), "methods": {}}

    def point(method: str, level: float) -> dict:
        candidate, _ = sparsified(model, method, level, calibration)
        ppl = onnx_perplexity(candidate, windows)
        if progress:
            progress(f"{method} {level:.3f}: perplexity {ppl:.4f} ({ppl / baseline - 1:+.2%})")
        return {"sparsity": round(float(level), 4), "perplexity": round(ppl, 5), "change": round(ppl / baseline - 1, 5)}

    for method in methods:
        curve = [point(method, level) for level in levels]
        passed = [p["sparsity"] for p in curve if p["perplexity"] <= limit]
        low = max([0.0] + [p["sparsity"] for p in curve if p["perplexity"] <= limit and
                           all(q["perplexity"] <= limit for q in curve if q["sparsity"] <= p["sparsity"])])
        failed = [p["sparsity"] for p in curve if p["sparsity"] > low and p["perplexity"] > limit]
        high = min(failed) if failed else None
        for _ in range(BISECTION_STEPS if high is not None else 0):
            middle = (low + high) / 2
            entry = point(method, middle)
            curve.append(entry)
            low, high = (middle, high) if entry["perplexity"] <= limit else (low, middle)
        curve.sort(key=lambda p: p["sparsity"])
        result["methods"][method] = {"best_sparsity": round(low, 4), "curve": curve,
                                     "grid_levels_within": passed}
    return result


def plot_curves(result: dict, path: str | Path, title: str = "") -> Path:
    """Sparsity vs perplexity per method, with the tolerance line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for method, data in result["methods"].items():
        xs = [0.0] + [p["sparsity"] for p in data["curve"]]
        ys = [result["baseline_perplexity"]] + [p["perplexity"] for p in data["curve"]]
        label = f"{method} (PPL-{result['tolerance']:.0%}: {data['best_sparsity']:.0%})"
        ax.plot(xs, ys, marker="o", ms=3, label=label)
    ax.axhline(result["limit"], color="gray", ls="--", lw=1, label=f"+{result['tolerance']:.0%} perplexity")
    ax.set_xlabel("FFN activation sparsity")
    ax.set_ylabel("held-out perplexity")
    ax.set_title(title or "sparsity vs perplexity")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def parse_tolerance(text: str) -> float:
    """'1%' -> 0.01, '0.01' -> 0.01."""
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise ActsparseError(f"bad perplexity tolerance {text!r}; use e.g. 1% or 0.01") from None
    if not 0 < value < 10:
        raise ActsparseError(f"perplexity tolerance must be in (0, 1000%), got {text!r}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m actsparse.lm.perplexity", description=__doc__.splitlines()[0])
    parser.add_argument("model", help="ONNX causal LM: input_ids [1, L] -> logits (byte tokens, e.g. actsparse.lm)")
    parser.add_argument("--ppl-tolerance", default="1%", help="allowed perplexity rise (1%% or 0.01)")
    parser.add_argument("--methods", default="teal,wina,chess")
    parser.add_argument("--levels", default=",".join(map(str, DEFAULT_LEVELS)))
    parser.add_argument("--windows", type=int, default=32, help="held-out windows measured")
    parser.add_argument("--calib", type=int, default=16, help="calibration windows (training split)")
    parser.add_argument("--out", default=".", help="directory for ppl_tolerance.json and .png")
    args = parser.parse_args(argv)
    try:
        from actsparse.frontend.onnx_file import load_model

        model = load_model(args.model)
        tolerance = parse_tolerance(args.ppl_tolerance)
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        for method in methods:
            method_pass(method, 0.5)
        levels = [float(v) for v in args.levels.split(",")]
        seq_len = _sequence_length(model)
        from actsparse.lm.data import corpus_tokens, eval_windows

        windows = eval_windows(corpus_tokens("heldout"), seq_len, args.windows)
        calibration = windows_as_samples(eval_windows(corpus_tokens("train"), seq_len, args.calib))
        result = ppl_tolerance(model, calibration, windows, tolerance=tolerance, methods=methods, levels=levels,
                               progress=lambda line: print(line, file=sys.stderr, flush=True))
    except (ActsparseError, ValueError) as exc:
        print(f"actsparse: error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ppl_tolerance.json").write_text(json.dumps(result, indent=1))
    plot_curves(result, out / "ppl_tolerance.png")
    for method, data in result["methods"].items():
        print(f"{method}: PPL-{tolerance:.0%} sparsity {data['best_sparsity']:.1%}")
    return 0


def _sequence_length(model: ir.Model) -> int:
    shape = model.graph.inputs[0].shape
    if shape is None or len(shape) != 2 or not isinstance(shape[1], int):
        raise ActsparseError("the model's first input must be input_ids with a static shape [1, L]")
    return int(shape[1])


if __name__ == "__main__":
    raise SystemExit(main())
