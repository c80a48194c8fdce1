"""Quantization and pruning of the real all-MiniLM-L6-v2: size, onnxruntime speed, accuracy.

For fp32, int8 static, int8 dynamic, int4 g128 (RTN and GPTQ), int4 g128 on top of 50 % TEAL
sparsify, and 2:4 pruning, this optimizes the ONNX model with actsparse, runs it in onnxruntime
at batch 1, sequence 128, and prints a markdown table: weight size of the linears (MB), median
time of N runs and speed relative to fp32 (measured in the same run), and the mean cosine of
sentence embeddings (mean-pooled, normalized) to fp32's, on sentences disjoint from the
calibration sentences. Sentences, tokenizer and embedding helpers come from minilm_sparsity.py.

    python examples/minilm_quantize.py             # all rows
    python examples/minilm_quantize.py --runs 20   # fewer timing runs
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))

import minilm_sparsity as sentences  # noqa: E402  (the sibling example: sentence lists and helpers)

SEQ_LEN = 128
RESULTS = Path(__file__).parent / "results" / "minilm_quantize.json"

VARIANTS = {
    "fp32": [],
    "int8 static": [("quantize", {"bits": 8})],
    "int8 static, percentile": [("quantize", {"bits": 8, "calib": "percentile"})],
    "int8 dynamic": [("quantize", {"bits": 8, "mode": "dynamic"})],
    "int4 g128": [("quantize", {"bits": 4, "group": 128})],
    "int4 g128 asym gptq": [("quantize", {"bits": 4, "group": 128, "symmetric": False, "rounding": "gptq"})],
    "int4 g128 asym gptq + sparsify 50%": [
        ("sparsify", {"method": "teal", "sparsity": 0.5}),
        ("quantize", {"bits": 4, "group": 128, "symmetric": False, "rounding": "gptq"})],
    "prune 2:4": [("prune", {"method": "nm", "n": 2, "m": 4})],
}


def time_models(models: dict, feeds: dict[str, np.ndarray], runs: int) -> dict[str, float]:
    """Median seconds per run of each model in onnxruntime. The sessions take turns run by run,
    so that the shared machine's drifting load hits every variant alike; threads do not spin
    after a run (a spinning idle session would slow the next one down)."""
    import onnx_ir as ir
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sessions = {name: ort.InferenceSession(ir.serde.serialize_model(model).SerializeToString(), options,
                                           providers=["CPUExecutionProvider"]) for name, model in models.items()}
    for session in sessions.values():
        for _ in range(2):
            session.run(None, feeds)
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(runs):
        for name, session in sessions.items():
            start = time.perf_counter()
            session.run(None, feeds)
            times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def linear_weight_bytes(model) -> int:
    """Bytes of the initializers the linears read (float, quantized, scales, zero points)."""
    used = set()
    for node in model.graph:
        if node.op_type in ("MatMul", "Gemm", "MatMulNBits", "MatMulInteger", "DequantizeLinear"):
            used |= {v.name for v in node.inputs if v is not None and v.is_initializer()}
    initializers = model.graph.initializers
    return sum(initializers[name].const_value.nbytes for name in used
               if name in initializers and initializers[name].const_value.nbytes > 64)


def main(argv=None) -> int:
    import actsparse
    from actsparse.frontend.onnx_file import load_model

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50, help="timing runs per variant (median)")
    parser.add_argument("--work-dir", default=None, help="where the exported ONNX file is cached")
    parser.add_argument("--only", nargs="*", default=None, help="variants to run (default: all)")
    args = parser.parse_args(argv)

    sentences.SEQ_LEN = SEQ_LEN  # the helpers read the module's sequence length
    work = Path(args.work_dir or Path.home() / ".cache" / "actsparse")
    work.mkdir(parents=True, exist_ok=True)
    onnx_path = work / f"all-MiniLM-L6-v2-seq{SEQ_LEN}.onnx"
    if not onnx_path.exists():
        print(f"exporting all-MiniLM-L6-v2 to {onnx_path} ...", file=sys.stderr)
        sentences.export_minilm(onnx_path)
    calibration = sentences.tokenize(sentences.CALIBRATION_SENTENCES)
    evaluation = sentences.tokenize(sentences.EVAL_SENTENCES)
    dense = load_model(onnx_path)
    reference = sentences.embed(dense, evaluation)

    rows, models = [], {}
    for variant, passes in VARIANTS.items():
        if args.only and variant not in args.only:
            continue
        start = time.perf_counter()
        model = load_model(onnx_path)
        if passes:
            model = actsparse.optimize(model, passes=passes, calib=calibration, verify=False).model
        cosine = float(np.mean(np.sum(sentences.embed(model, evaluation) * reference, axis=1)))
        models[variant] = model
        rows.append({"variant": variant, "weight_mb": round(linear_weight_bytes(model) / 1e6, 2),
                     "cosine": round(cosine, 4)})
        print(f"{variant:36s} cosine {cosine:.4f}  ({time.perf_counter() - start:.0f}s)", file=sys.stderr)
    seconds = time_models(models, evaluation[0], args.runs)
    for row in rows:
        row["ms"] = round(seconds[row["variant"]] * 1e3, 2)
    base = next((r["ms"] for r in rows if r["variant"] == "fp32"), None)
    for row in rows:
        row["speedup_vs_fp32"] = round(base / row["ms"], 2) if base else None
    print(markdown_table(rows, args.runs))
    if not args.only:
        RESULTS.parent.mkdir(exist_ok=True)
        RESULTS.write_text(json.dumps({"model": "all-MiniLM-L6-v2", "batch": 1, "seq_len": SEQ_LEN, "runs": args.runs,
                                       "threads": os.cpu_count(), "rows": rows}, indent=2) + "\n")
    return 0


def markdown_table(rows: list[dict], runs: int) -> str:
    lines = [f"| variant | weights (MB) | ORT time, median of {runs} (ms) | speed vs fp32 | embedding cosine |",
             "|---|---|---|---|---|"]
    for r in rows:
        speed = f"{r['speedup_vs_fp32']:.2f}x" if r.get("speedup_vs_fp32") else ""
        lines.append(f"| {r['variant']} | {r['weight_mb']:.2f} | {r['ms']:.2f} | {speed} | {r['cosine']:.4f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
