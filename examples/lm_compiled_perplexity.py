"""Perplexity through the compiled decode path (KV cache, batch-1 kernels) next to onnxruntime's.

    .venv/bin/python examples/lm_compiled_perplexity.py [--dir runs/lm_mini] [--size mini]
        [--train-steps 240] [--windows 32] [--out benchmarks/results/lm_mini_compiled.json]

1. trains (or loads, cached) the in-repo LM with the configuration of the committed results
   (benchmarks/results/lm_mini.json: 240 steps of 16 x 128 tokens, lr 4e-3, seed 0);
2. onnxruntime: the full-sequence model (input_ids [1, 128] -> logits) on the held-out windows,
   as examples/lm_sparsity.py measures it;
3. compiled: the decode step compiled for this machine, run token by token over the same windows
   (`LanguageModel.perplexity`), dense, with TEAL at 50 % (FFN inputs, as the README's table;
   every linear; and every linear with the LM head) and with R-Sparse at 50 / 70 % (FFN inputs; `--only R-Sparse` runs just
   those), thresholds calibrated on decode steps of built-in text;
4. relufied (SiLU -> ReLU + ProSparse L1 fine-tuning, as lm_mini.json's relufy stage: 150 steps,
   lr 2e-3, L1 stages 0.05/0.15/0.3), compiled as it is (the ReLU-gated FFN kernel) and with a
   rank-32 active-neuron predictor (`predictor{mode=threshold,recall=0.95}`, lm_mini.json's
   "threshold r95"), trained on 4,096 decode steps of built-in text.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PREDICTOR_CALIBRATION_STEPS = 4096  # rows the predictor trains on (lm_mini.json's: 48 windows x 128)
VARIANTS = {
    "dense": None,
    "TEAL 50% (FFN inputs)": "sparsify{method=teal,sparsity=0.5,scope=ffn}",
    "TEAL 50% (all linears)": "sparsify{method=teal,sparsity=0.5}",
    "TEAL 40% (all linears)": "sparsify{method=teal,sparsity=0.4}",
    "TEAL 50% (all linears and the LM head)": "sparsify{method=teal,sparsity=0.5,scope=linears}",
    "R-Sparse 50% (FFN inputs)": "rsparse{sparsity=0.5,scope=ffn}",
    "R-Sparse 70% (FFN inputs)": "rsparse{sparsity=0.7,scope=ffn}",
}


def onnxruntime_perplexity(model, windows: np.ndarray) -> float:
    """Full-sequence perplexity: the LM exported to ONNX (input_ids [1, L] -> logits), run by
    onnxruntime on each window, as examples/lm_sparsity.py measures it."""
    from actsparse.frontend.torch_export import export_hf
    from actsparse.lm.perplexity import onnx_perplexity

    return onnx_perplexity(export_hf(model, seq_len=windows.shape[1] - 1), windows)


def compiled_perplexity(lm, windows: np.ndarray) -> float:
    nll, count = 0.0, 0
    for window in windows:
        nll += np.log(lm.perplexity(window.tolist())) * (len(window) - 1)
        count += len(window) - 1
    return float(np.exp(nll / count))


def relufied_rows(args, windows: np.ndarray, reference: float) -> list[dict]:
    import actsparse
    from actsparse.lm.compile import compile_causal_lm
    from actsparse.lm.data import corpus_tokens
    from actsparse.lm.model import load_lm, save_lm
    from actsparse.train.relufy import relufy

    folder = Path(args.dir) / "relufied"
    if not (folder / "model.safetensors").is_file():
        model = load_lm(args.dir)
        result = relufy(model, corpus_tokens("train", Path(args.dir)), eval_windows=windows[:8], act="relu",
                        steps=150, lr=2e-3, l1_stages=(0.05, 0.15, 0.3), seq_len=128, batch=16, export=False)
        model.config.hidden_act = "relu"  # the swapped activation, for readers of the checkpoint
        save_lm(model, folder)
    relufied_reference = onnxruntime_perplexity(load_lm(folder), windows)
    print(f"onnxruntime, relufied, full sequence: perplexity {relufied_reference:.5f}")
    rows = []
    for label, passes in (("relufied", None), ("relufied + predictor (threshold, recall 0.95)",
                                                "predictor{mode=threshold,recall=0.95}")):
        art = compile_causal_lm(folder, "host", passes, output=folder / "compiled.actsparse",
                                max_context=windows.shape[1], calibration_steps=PREDICTOR_CALIBRATION_STEPS)
        ppl = compiled_perplexity(actsparse.load(art.path), windows)
        kernels = sorted({k["kernel"] for k in art.kernels if "mlp" in k["name"]})
        rows.append({"variant": label, "passes": passes, "perplexity": round(ppl, 5), "ffn_kernels": kernels,
                     "onnxruntime_relufied_perplexity": round(relufied_reference, 5),
                     "change_vs_onnxruntime_dense": round(ppl / reference - 1, 5),
                     "change_vs_onnxruntime_relufied": round(ppl / relufied_reference - 1, 5)})
        print(f"compiled decode path, {label}: perplexity {ppl:.5f} ({ppl / relufied_reference - 1:+.2%} vs "
              f"onnxruntime relufied; FFN kernels {kernels})")
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=str(ROOT / "runs" / "lm_mini"))
    parser.add_argument("--size", default="mini")
    parser.add_argument("--train-steps", type=int, default=240)
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "lm_mini_compiled.json"))
    parser.add_argument("--only", default=None,
                        help="only the variants whose label contains this text (no relufied rows), e.g. R-Sparse")
    args = parser.parse_args(argv)

    import actsparse
    from actsparse.lm.compile import compile_causal_lm
    from actsparse.lm.data import corpus_tokens, eval_windows
    from actsparse.lm.model import load_lm
    from actsparse.lm.train import TrainOptions, train_lm

    options = TrainOptions(size=args.size, steps=args.train_steps, seq_len=128, batch=16, lr=4e-3, warmup=20)
    metrics = train_lm(args.dir, options)
    windows = eval_windows(corpus_tokens("heldout", Path(args.dir)), args.seq_len, args.windows).astype(np.int64)
    reference = onnxruntime_perplexity(load_lm(args.dir), windows)
    print(f"onnxruntime, full sequence: perplexity {reference:.5f} ({len(windows)} windows of {args.seq_len})")
    rows = []
    variants = {label: p for label, p in VARIANTS.items() if args.only is None or args.only in label}
    for label, passes in variants.items():
        start = time.perf_counter()
        art = compile_causal_lm(args.dir, "host", passes, output=Path(args.dir) / "compiled.actsparse",
                                max_context=windows.shape[1])
        lm = actsparse.load(art.path)
        ppl = compiled_perplexity(lm, windows)
        rows.append({"variant": label, "passes": passes, "perplexity": round(ppl, 5),
                     "change_vs_onnxruntime_dense": round(ppl / reference - 1, 5),
                     "seconds": round(time.perf_counter() - start, 1)})
        print(f"compiled decode path, {label}: perplexity {ppl:.5f} ({ppl / reference - 1:+.2%} vs onnxruntime dense)")
    if args.only is None:
        rows += relufied_rows(args, windows, reference)
    elif Path(args.out).exists():  # keep the rows of what did not run, in their order
        ran = {row["variant"] for row in rows}
        rows = [row for row in json.loads(Path(args.out).read_text())["compiled"] if row["variant"] not in ran] + rows
    results = {"model": {"size": args.size, "train_steps": metrics["step"], "parameters": metrics["parameters"]},
               "windows": len(windows), "seq_len": args.seq_len, "onnxruntime_perplexity": round(reference, 5),
               "compiled": rows}
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    return results


if __name__ == "__main__":
    main()
    sys.exit(0)
