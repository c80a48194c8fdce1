"""The main job on a built-in example model, end to end (`make demo`).

1. writes a Llama-style SwiGLU FFN stack (4 layers, d=1024, f=2816: 138 MB of fp32 weights,
   several times the last-level cache, as in batch-1 decoding);
2. sparsifies the FFN inputs with TEAL at 50 % (thresholds calibrated on generated inputs)
   and reports the accuracy cost;
3. compiles the dense and the sparse model for this machine with actsparse's kernels;
4. checks both against onnxruntime and times them against it on rotating inputs;
5. generates text: the in-repo byte-level LM (Llama architecture, 0.9 M parameters, trained ~1 minute on
   the Python standard library here), compiled dense and with TEAL 50 % on every linear of its
   decode step, generating over the KV cache with the thin runtime.

    python examples/demo.py [--work-dir DIR] [--layers 4]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", help="where the model and artifacts go (default: a temp dir)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--sparsity", type=float, default=0.5)
    args = parser.parse_args(argv)

    import onnx_ir as ir
    import onnxruntime as ort

    import actsparse
    from actsparse.benchmark.artifact import bench_artifact
    from actsparse.frontend.onnx_file import save_model
    from actsparse.frontend.zoo import swiglu_stack

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="actsparse-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    dense_onnx, sparse_onnx = work / "ffn.onnx", work / "ffn.teal.onnx"
    save_model(ir.serde.deserialize_model(swiglu_stack(layers=args.layers, d=1024, f=2816)), dense_onnx)
    print(f"1. model: {dense_onnx} ({args.layers} SwiGLU FFN layers, d=1024, f=2816)")

    passes = f"sparsify{{method=teal,sparsity={args.sparsity},scope=ffn}}"
    optimized = actsparse.optimize(str(dense_onnx), passes=passes)
    optimized.save(sparse_onnx)
    record = optimized.records[-1]
    print(f"2. {passes}: output cosine to dense {record.vs_original.cosine:.4f}, "
          f"weight bytes skippable {record.report['skippable_weight_fraction']:.0%}")

    x = np.random.default_rng(1).standard_normal((1, 1024)).astype(np.float32)
    rows = []
    for label, onnx_path in (("dense", dense_onnx), (f"TEAL {args.sparsity:.0%}", sparse_onnx)):
        artifact = actsparse.compile(str(onnx_path), target="host", output=work / f"{onnx_path.stem}.actsparse")
        expected = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        actual = artifact.run(x=x)["y"]
        error = float(np.max(np.abs(actual - expected)))
        print(f"3. compiled {label}: {artifact.path} in {artifact.seconds['total']:.1f}s, "
              f"max |actsparse - onnxruntime| = {error:.2e}")
        if error > 1e-3:
            print("   mismatch against onnxruntime", file=sys.stderr)
            return 1
        timing = bench_artifact(artifact.load(), str(dense_onnx), iters=20)
        rows.append((label, timing))

    print("\n4. batch-1 latency on this machine (onnxruntime runs the dense model):\n")
    print("| model | actsparse ms | onnxruntime ms | speed vs ORT | weight GB/s |")
    print("|---|---|---|---|---|")
    for label, timing in rows:
        ours, theirs = timing["rows"]
        print(f"| {label} | {ours['ms']:.2f} | {theirs['ms']:.2f} | {ours['speedup_vs_onnxruntime']:.2f}x | "
              f"{ours['weight_gbs']:.1f} |")
    print(f"\nmemory bandwidth (numpy copy probe): {rows[0][1]['copy_bandwidth_gbs']} GB/s; work dir: {work}")
    print("weight GB/s counts every weight byte of the model per run; the sparse model reads only the rows of "
          "active inputs, so its figure can pass the bandwidth")
    return generation(work)


def generation(work: Path) -> int:
    """Step 5: a causal LM compiled for generation (KV-cache decode step), dense and TEAL 50 %."""
    from actsparse.lm.compile import compile_causal_lm
    from actsparse.lm.data import corpus_tokens
    from actsparse.lm.train import example_lm

    folder = work / "lm"
    metrics = example_lm(folder, size="mini", steps=300)
    print(f"\n5. generation: {folder} (actsparse.lm mini, {metrics['parameters']:,} parameters, held-out "
          f"perplexity {metrics['heldout_perplexity']:.2f} after {metrics['step']} training steps)")
    text = corpus_tokens("heldout", folder)[:257].tolist()
    prompt = "def __init__(self, "
    for label, passes in (("dense", None), ("TEAL 50%", "sparsify{method=teal,sparsity=0.5}")):
        artifact = compile_causal_lm(folder, "host", passes, output=work / f"lm.{label.split()[0].lower()}.actsparse",
                                     max_context=512)
        lm = artifact.load()
        sample = lm.generate_text(prompt, 80, temperature=0.7, top_k=40, seed=0, stop_tokens=[])
        print(f"   {label}: perplexity on 256 held-out bytes {lm.perplexity(text):.2f}; "
              f"{lm.stats.decode_tokens_per_second:.0f} tok/s decode")
        print("   " + repr(prompt + sample))
    print("   (a 0.9 M-parameter model trained for a minute: the point is the path, not the prose)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
