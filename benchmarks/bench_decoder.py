"""Batch-1 decode step of a random-init Llama decoder stack: actsparse vs onnxruntime vs torch vs TVM.

The model: transformers' LlamaModel (hidden 1024, SwiGLU FFN 2816, 16 heads / 8 KV heads,
4 layers by default, vocab 1024 so the embedding is small), exported with actsparse's dynamo
frontend at input_ids [1, 1]: one token, no KV cache, so attention is over the token itself.
The time of a decode step at batch 1 is the time to stream the weights, which is what
activation sparsity cuts; a fixed-length KV cache as graph inputs was not attempted (the
cache adds a small, sparsity-independent attention cost).

Engines, all in the same run: actsparse dense and TEAL 50 % (our kernels), onnxruntime on the
dense and on the sparsified ONNX (actsparse ops run through their ONNX function bodies),
torch eager, and TVM's default build of the dense ONNX (from_onnx + tvm.compile, no actsparse
kernels). The weights (4 layers: ~200 MB) are several times the L3 cache, so every step reads
them from DRAM. Times are the best of several blocks, round-robin across engines (shared machine); GB/s counts the
dense weight bytes per step, for every engine, so it is comparable across rows. The read probe
(``kernels/cpu/probe.read_sum``: a plain read of as many bytes as the weights) runs in the same
rounds; "of read bound" is each engine's speed as a share of it (median of same-round ratios).

    python benchmarks/bench_decoder.py [--layers 4] [--iters 20] [--skip-tvm-default]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import copy_bandwidth_gbs, l3_cache_bytes, read_bound_call  # noqa: E402

from actsparse.benchmark.timing import interleaved_blocks, paired_speedup  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
READ_BOUND = "read bound (plain read of the same bytes)"
VOCAB = 1024
TEAL = "sparsify{method=teal,sparsity=0.5}"


def llama_stack(layers: int, hidden: int, intermediate: int, seed: int = 0):
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=256,
    )
    return transformers.LlamaModel(config).eval()


def weight_bytes(model) -> int:
    """Bytes of the linear weights read per decode step (embedding rows excluded)."""
    return sum(p.numel() * 4 for name, p in model.named_parameters() if p.dim() == 2 and "embed" not in name)


def ort_session(model_or_path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    source = model_or_path if isinstance(model_or_path, (str, os.PathLike)) else model_or_path.SerializeToString()
    return ort.InferenceSession(str(source) if isinstance(source, Path) else source, options,
                                providers=["CPUExecutionProvider"])


def tvm_default(path: Path, feeds_names: list[str]):
    """TVM's own build of the dense ONNX: from_onnx + tvm.compile, no actsparse kernels."""
    import onnx
    import tvm
    from tvm import relax
    from tvm.relax.frontend import detach_params
    from tvm.relax.frontend.onnx import from_onnx

    from actsparse.codegen.targets import resolve_target

    target = resolve_target("host")
    mod = from_onnx(onnx.load(str(path)), keep_params_in_input=True)
    mod, params = detach_params(mod)
    vm = relax.VirtualMachine(tvm.compile(mod, target), tvm.cpu())
    weights = [tvm.runtime.tensor(p.numpy()) for p in params["main"]]

    def run(feeds):
        return vm["main"](*[tvm.runtime.tensor(feeds[n]) for n in feeds_names], *weights).numpy()

    return run


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--blocks", type=int, default=9)
    parser.add_argument("--skip-tvm-default", action="store_true", help="skip TVM's default build (slow)")
    parser.add_argument("--output", default=str(RESULTS / "decoder.json"))
    args = parser.parse_args(argv)

    import onnx_ir as ir
    import torch

    import actsparse
    from actsparse.frontend.onnx_file import save_model
    from actsparse.frontend.torch_export import export_hf

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    work = Path(tempfile.mkdtemp(prefix="bench-decoder-"))
    model = llama_stack(args.layers, args.hidden, args.intermediate)
    nbytes = weight_bytes(model)
    print(f"Llama stack: {args.layers} layers, hidden {args.hidden}, FFN {args.intermediate}: "
          f"{nbytes / 1e6:.0f} MB of weights per step; L3 {l3_cache_bytes() >> 20} MB; {threads} threads", flush=True)
    dense_path = work / "decoder.onnx"
    save_model(export_hf(model, seq_len=1), dense_path)

    rng = np.random.default_rng(0)
    feeds_list = [{"input_ids": rng.integers(0, VOCAB, (1, 1)).astype(np.int64)} for _ in range(16)]
    calibration = [{"input_ids": rng.integers(0, VOCAB, (1, 1)).astype(np.int64)} for _ in range(32)]
    sparse = actsparse.optimize(str(dense_path), passes=TEAL, calib=calibration)
    sparse_proto = ir.serde.serialize_model(sparse.model)

    start = time.perf_counter()
    dense_art = actsparse.compile(str(dense_path), example_inputs=feeds_list[0], output=work / "dense.actsparse")
    compile_dense = time.perf_counter() - start
    sparse_art = actsparse.compile(sparse.model, example_inputs=feeds_list[0], output=work / "teal.actsparse")
    dense_rt, sparse_rt = dense_art.load(), sparse_art.load()
    ort_dense, ort_sparse = ort_session(dense_path, threads), ort_session(sparse_proto, threads)

    # Same ONNX, same answer: the compiled models against onnxruntime.
    errors = {
        "dense": float(np.abs(next(iter(dense_rt.run(**feeds_list[0]).values()))
                              - ort_dense.run(None, feeds_list[0])[0]).max()),
        "teal50": float(np.abs(next(iter(sparse_rt.run(**feeds_list[0]).values()))
                               - ort_sparse.run(None, feeds_list[0])[0]).max()),
    }

    def feeds(i):
        return feeds_list[i % len(feeds_list)]

    engines = {
        "actsparse dense": lambda i: dense_rt.run(**feeds(i)),
        "actsparse TEAL 50%": lambda i: sparse_rt.run(**feeds(i)),
        "onnxruntime dense": lambda i: ort_dense.run(None, feeds(i)),
        "onnxruntime TEAL 50% ONNX": lambda i: ort_sparse.run(None, feeds(i)),
    }
    with torch.no_grad():
        torch_ids = [torch.from_numpy(f["input_ids"]) for f in feeds_list]
        engines["torch eager"] = lambda i: model(input_ids=torch_ids[i % len(torch_ids)], use_cache=False)
        engines[READ_BOUND] = read_bound_call(nbytes)
        if not args.skip_tvm_default:
            run_tvm = tvm_default(dense_path, ["input_ids"])
            engines["TVM default build"] = lambda i: run_tvm(feeds(i))
        iters = {name: max(2, args.iters // 10) if name == "TVM default build" else args.iters for name in engines}
        blocks = interleaved_blocks(engines, iters, args.blocks)
        times = {name: min(block_times) for name, block_times in blocks.items()}
        for name, seconds in times.items():
            print(f"  {name}: {seconds * 1e3:.2f} ms", flush=True)
    bandwidth = copy_bandwidth_gbs()

    speedups = {name: paired_speedup(blocks["onnxruntime dense"], blocks[name]) for name in times}
    shares = {name: paired_speedup(blocks[READ_BOUND], blocks[name])[0] for name in times}
    print(f"\nBatch-1 decode step, {args.layers}-layer Llama stack ({nbytes / 1e6:.0f} MB fp32), "
          f"machine copy bandwidth {bandwidth:.1f} GB/s\n")
    print("| engine | ms / step (best block) | vs ORT dense (median of block pairs) | quartiles | GB/s (dense bytes) "
          "| of read bound |")
    print("|---|---|---|---|---|---|")
    rows = []
    for name, seconds in times.items():
        gbs = nbytes / seconds / 1e9
        median, q25, q75 = speedups[name]
        print(f"| {name} | {seconds * 1e3:.2f} | {median:.2f}x | {q25:.2f}-{q75:.2f} | {gbs:.1f} | {shares[name]:.2f} |")
        rows.append({"engine": name, "ms": seconds * 1e3, "speedup_vs_ort_dense": median,
                     "speedup_quartiles": [q25, q75], "gbs": gbs, "share_of_read_bound": shares[name]})
    print(f"\nmax |actsparse - onnxruntime| on the same ONNX: dense {errors['dense']:.2e}, "
          f"TEAL {errors['teal50']:.2e}; compile (dense) {compile_dense:.1f} s")
    result = {
        "model": {"layers": args.layers, "hidden": args.hidden, "intermediate": args.intermediate,
                  "heads": 16, "kv_heads": 8, "vocab": VOCAB, "input": "input_ids [1, 1], no KV cache"},
        "weight_bytes": nbytes, "threads": threads, "l3_bytes": l3_cache_bytes(),
        "copy_bandwidth_gbs": bandwidth, "max_abs_error_vs_ort": errors, "compile_seconds_dense": compile_dense,
        "kernels": {"dense": [k["kernel"] for k in dense_art.kernels],
                    "teal50": [k["kernel"] for k in sparse_art.kernels]},
        "rows": rows,
        "note": "ms: best block; speed-ups: median over blocks of the same-round ratio to onnxruntime dense "
                "(engines interleaved block by block on a shared machine); only ratios from one run are meaningful",
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.output}")
    return result


if __name__ == "__main__":
    main()
