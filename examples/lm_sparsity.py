"""Activation sparsity on a real (small) LM, end to end, with honest numbers.

    .venv/bin/python examples/lm_sparsity.py --dir runs/lm [--size small] [--train-minutes 60]
        [--train-steps 1200] [--relufy-steps 400] [--stages train,methods,tolerance,relufy,control,predictor]

1. train (or load, cached) the Llama-architecture LM on the stdlib corpus (actsparse.lm.train);
2. export it to ONNX (input_ids [1, L] -> logits) and measure held-out perplexity through ORT;
3. methods: TEAL / WINA / CATS / CHESS on the FFNs at 40 % and 50 % sparsity, perplexity change;
4. tolerance: PPL-1 % (highest sparsity whose perplexity rises <= 1 %) per method, plot;
5. relufy: SiLU -> ReLU + ProSparse progressive-L1 fine-tuning, per-layer sparsity, perplexity;
   control: the SiLU model fine-tuned on the same batches without swap or L1 (an under-trained
   LM improves from any extra steps: the fair reference for relufy's perplexity);
6. predictor: the low-rank active-neuron predictor on the relufied ONNX: recall / precision /
   predicted-active per layer, and the end perplexity with the predicted masks applied;
7. rsparse: R-Sparse (paper basis and basis=activation) next to TEAL / WINA / CATS / CHESS, all
   on the FFNs: perplexity change at 40/50/60/70 % and PPL-1 % sparsity (stored under "rsparse").
Writes --out (default benchmarks/results/lm_<size>.json: everything) and, beside it,
lm_<size>_ppl_tolerance.png/.json.

The committed results: the 10.7 M "small" LM (benchmarks/results/lm_small.json; 1,200 steps, about
40 minutes at the 2,050 tokens/s two quiet cores train at), every stage in one run:
    examples/lm_sparsity.py --dir runs/lm_small --size small --train-steps 1200 --train-minutes 60 \
        --seq-len 256 --batch 16 --lr 2e-3 --relufy-steps 400 --relufy-lr 1e-3 --relufy-l1 0.05,0.15,0.3 \
        --threads 2 --out benchmarks/results/lm_small.json
and the earlier 0.9 M "mini" LM (benchmarks/results/lm_mini.json):
    examples/lm_sparsity.py --dir /tmp/lm_mini --size mini --train-steps 240 --seq-len 128 --batch 16 \
        --lr 4e-3 --relufy-steps 150 --relufy-lr 2e-3 --relufy-l1 0.05,0.15,0.3 --threads 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
STAGES = ("train", "methods", "tolerance", "relufy", "control", "predictor", "rsparse")
RSPARSE_METHODS = ("teal", "wina", "cats", "chess", "rsparse", "rsparse-act")
RSPARSE_LEVELS = (0.4, 0.5, 0.6, 0.7)


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=str(ROOT / "runs" / "lm"), help="LM run directory (cached)")
    parser.add_argument("--size", default="small")
    parser.add_argument("--train-steps", type=int, default=1200)
    parser.add_argument("--train-minutes", type=float, default=60.0)
    parser.add_argument("--seq-len", type=int, default=256, help="training window")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--eval-len", type=int, default=128, help="ONNX sequence length for perplexity")
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--calib-windows", type=int, default=16)
    parser.add_argument("--relufy-steps", type=int, default=400)
    parser.add_argument("--relufy-lr", type=float, default=1e-3)
    parser.add_argument("--relufy-l1", default="0.05,0.15,0.3", help="ProSparse L1 stage factors")
    parser.add_argument("--relufy-minutes", type=float, default=None)
    parser.add_argument("--predictor-rank", type=int, default=32)
    parser.add_argument("--stages", default=",".join(STAGES))
    parser.add_argument("--rsparse-methods", default=",".join(RSPARSE_METHODS), help="methods of the rsparse stage")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="default: benchmarks/results/lm_<size>.json")
    args = parser.parse_args(argv)
    stages = set(args.stages.split(","))

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from actsparse.frontend.torch_export import export_hf
    from actsparse.lm.data import corpus_tokens, eval_windows
    from actsparse.lm.model import load_lm, save_lm
    from actsparse.lm.train import TrainOptions, perplexity, train_lm
    from actsparse.lm.perplexity import onnx_perplexity, plot_curves, ppl_tolerance, sparsified, windows_as_samples

    out_path = Path(args.out or RESULTS / f"lm_{args.size}.json")
    results = json.loads(out_path.read_text()) if out_path.exists() else {}
    run_dir = Path(args.dir)

    def save():
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(results, indent=1))

    options = TrainOptions(size=args.size, steps=args.train_steps, seq_len=args.seq_len, batch=args.batch,
                           lr=args.lr, warmup=max(1, args.train_steps // 12))
    if "train" in stages:
        log(f"training/loading the {args.size} LM in {run_dir}")
        results["train"] = train_lm(run_dir, options, minutes=args.train_minutes)
        save()
    model = load_lm(run_dir)
    heldout = eval_windows(corpus_tokens("heldout", run_dir), args.eval_len, args.eval_windows)
    train_tokens = corpus_tokens("train", run_dir)
    calibration = windows_as_samples(eval_windows(train_tokens[len(train_tokens) // 2:], args.eval_len,
                                                  args.calib_windows))
    onnx_model = export_hf(model, seq_len=args.eval_len)
    base_ppl = onnx_perplexity(onnx_model, heldout)
    results["eval"] = {"seq_len": args.eval_len, "windows": len(heldout), "tokens": int(heldout[:, 1:].size),
                       "onnx_perplexity": round(base_ppl, 5), "torch_perplexity": round(perplexity(model, heldout), 5)}
    log(f"held-out perplexity {base_ppl:.4f} (ONNX through ORT)")
    save()

    if "methods" in stages:
        table = {}
        for method in ("teal", "wina", "cats", "chess"):
            for level in (0.4, 0.5):
                candidate, report = sparsified(onnx_model, method, level, calibration)
                ppl = onnx_perplexity(candidate, heldout)
                table[f"{method}@{level}"] = {"method": method, "sparsity": level, "perplexity": round(ppl, 5),
                                              "change": round(ppl / base_ppl - 1, 5)}
                log(f"{method} {level:.0%}: perplexity {ppl:.4f} ({ppl / base_ppl - 1:+.2%})")
        results["methods"] = table
        save()

    if "tolerance" in stages:
        tolerance = ppl_tolerance(onnx_model, calibration, heldout, tolerance=0.01,
                                  methods=("teal", "wina", "cats", "chess"), progress=log)
        results["ppl_1pct"] = tolerance
        out_path.with_name(f"{out_path.stem}_ppl_tolerance.json").write_text(json.dumps(tolerance, indent=1))
        plot_curves(tolerance, out_path.with_name(f"{out_path.stem}_ppl_tolerance.png"),
                    title=f"{args.size} LM (stdlib bytes): FFN sparsity vs held-out perplexity")
        save()

    if "rsparse" in stages:
        methods = tuple(m for m in args.rsparse_methods.split(",") if m)
        changes = {}
        for method in methods:
            for level in RSPARSE_LEVELS:
                candidate, _ = sparsified(onnx_model, method, level, calibration)
                ppl = onnx_perplexity(candidate, heldout)
                changes[f"{method}@{level}"] = {"method": method, "sparsity": level, "perplexity": round(ppl, 5),
                                                "change": round(ppl / base_ppl - 1, 5)}
                log(f"{method} {level:.0%}: perplexity {ppl:.4f} ({ppl / base_ppl - 1:+.2%})")
        tolerance = ppl_tolerance(onnx_model, calibration, heldout, tolerance=0.01, methods=methods,
                                  progress=log)
        results["rsparse"] = {"levels": changes, "ppl_1pct": tolerance}
        plot_curves(tolerance, out_path.with_name(f"{out_path.stem}_rsparse_ppl_tolerance.png"),
                    title=f"{args.size} LM (stdlib bytes): FFN sparsity vs held-out perplexity")
        save()

    relufied_dir = run_dir / "relufied"
    if "relufy" in stages:
        from actsparse.train.relufy import relufy

        l1 = tuple(float(v) for v in args.relufy_l1.split(","))
        log(f"relufy: SiLU -> ReLU, {args.relufy_steps} steps, L1 stages {l1}")
        result = relufy(load_lm(run_dir), train_tokens, eval_windows=heldout, act="relu", steps=args.relufy_steps,
                        lr=args.relufy_lr, l1_stages=l1, seq_len=min(args.seq_len, 128), batch=args.batch,
                        export_seq_len=args.eval_len, minutes=args.relufy_minutes)
        save_lm(result.model, relufied_dir)
        from actsparse.frontend.onnx_file import save_model

        save_model(result.onnx, relufied_dir / "model.onnx")
        result.report["after"]["onnx_perplexity"] = round(onnx_perplexity(result.onnx, heldout), 5)
        results["relufy"] = result.report
        log(f"relufy: perplexity {result.report['before']['perplexity']} -> {result.report['after']['perplexity']} "
            f"({result.report['perplexity_change']:+.2%}), sparsity {result.report['after']['mean_sparsity']:.1%}")
        save()

    if "control" in stages:
        from actsparse.lm.train import fit, make_optimizer

        control = load_lm(run_dir)
        steps = args.relufy_steps
        log(f"control: SiLU model, same {steps} fine-tuning steps, no swap, no L1")
        fit(control, train_tokens, steps=steps, lr=args.relufy_lr, seq_len=min(args.seq_len, 128), batch=args.batch,
            seed=1, warmup=max(1, steps // 20), optimizer=make_optimizer(control, args.relufy_lr, 0.0),
            description="control fine-tune")
        results["control"] = {"steps": steps, "perplexity": round(perplexity(control, heldout), 5)}
        if "relufy" in results:
            results["relufy"]["perplexity_change_vs_control"] = round(
                results["relufy"]["after"]["perplexity"] / results["control"]["perplexity"] - 1, 5)
        log(f"control perplexity {results['control']['perplexity']}")
        save()

    if "predictor" in stages:
        import onnx_ir as ir

        from actsparse.frontend.onnx_file import load_model
        from actsparse.passes import PassContext
        from actsparse.passes.predictor import PredictorPass
        from actsparse.passes.base import parse_options

        relu_onnx = load_model(relufied_dir / "model.onnx")
        relu_ppl = onnx_perplexity(relu_onnx, heldout)
        predictor_calib = windows_as_samples(eval_windows(train_tokens, args.eval_len, 48))
        rows = {}
        for name, opts in {"threshold r95": {"mode": "threshold", "recall": 0.97},
                           "threshold r99": {"mode": "threshold", "recall": 0.995},
                           "topk 15%": {"mode": "topk", "active": 0.15},
                           "topk 30%": {"mode": "topk", "active": 0.3},
                           "statistical 30%": {"mode": "statistical", "active": 0.3}}.items():
            copy = ir.serde.deserialize_model(ir.serde.serialize_model(relu_onnx))
            pass_ = PredictorPass(parse_options(PredictorPass, {"rank": args.predictor_rank, **opts}),
                                  PassContext(calibration=predictor_calib))
            ppl = onnx_perplexity(pass_(copy).model, heldout)
            rows[name] = {**pass_.report, "perplexity": round(ppl, 5),
                          "change_vs_relufied": round(ppl / relu_ppl - 1, 5),
                          "change_vs_original": round(ppl / base_ppl - 1, 5)}
            log(f"predictor {name}: recall {pass_.report['recall_mean']:.3f} predicted-active "
                f"{pass_.report['predicted_active_mean']:.3f} perplexity {ppl:.4f} "
                f"({ppl / relu_ppl - 1:+.2%} vs relufied)")
        results["predictor"] = {"relufied_perplexity": round(relu_ppl, 5), "rank": args.predictor_rank, "modes": rows}
        save()
    log(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
