"""Batch-1 decode on an NVIDIA GPU: actsparse cuda artifacts vs torch eager (cuBLAS) and onnxruntime-gpu.

Models (fp32, one token):
  ffn      SwiGLU FFN stack, h += down(silu(gate(h)) * up(h))      (actsparse.frontend.zoo.swiglu_stack)
  decoder  per layer h += o(v(h)) then the SwiGLU FFN: a decoder layer at one position
           (attention over a single key is the identity on v; q, k do not change the output)
Variants: dense, relufy (fused gate-sparse FFN kernels), TEAL 50 % (sparse-input kernels).

Reported per row: time per token, ratio to torch eager and onnxruntime-gpu of the same model
(dense), weight GB/s (dense weight bytes / time: above the HBM figure means rows were
skipped) and its fraction of the HBM bandwidth measured here with a device-to-device copy.
The weights total several times the GPU's L2 cache (50 MB on an H100) so they stream from HBM.

Needs a CUDA GPU (exits with status 2 and the reason otherwise), nvcc, and torch with CUDA;
onnxruntime-gpu is used when its CUDAExecutionProvider is available.

    python benchmarks/bench_cuda.py [--d 2048 --f 5632 --layers 4] [--quick] [--output results/cuda.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"
VARIANTS = {"dense": None, "relufy": "relufy", "teal50": "sparsify{method=teal,sparsity=0.5,scope=ffn}"}


def gpu_or_exit() -> tuple[str, str]:
    """(GPU name, arch) of GPU 0, or exit 2 with the reason this machine cannot run the benchmark."""
    from actsparse.errors import ActsparseError
    from actsparse.runtime.ffi import cuda_devices

    try:
        name, arch = cuda_devices()[0]
    except ActsparseError as exc:
        print(f"bench_cuda: no CUDA GPU: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        import torch
    except ImportError:
        torch = None
    if torch is None or not torch.cuda.is_available():
        print("bench_cuda: needs torch with CUDA (the baseline and the bandwidth probe)", file=sys.stderr)
        raise SystemExit(2)
    return name, arch


def decoder_stack(layers: int, d: int, f: int, seed: int = 0):
    """ONNX: per layer h += (h @ Wv) @ Wo, then h += SwiGLU(h); x: [1, d]."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes, inits, h = [], [], "x"

    def linear(name, src, shape):
        w = (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)
        inits.append(numpy_helper.from_array(w, f"{name}.weight"))
        nodes.append(helper.make_node("MatMul", [src, f"{name}.weight"], [f"{name}.out"], name=name))
        return f"{name}.out"

    for i in range(layers):
        p = f"layers.{i}"
        o = linear(f"{p}.attn.o_proj", linear(f"{p}.attn.v_proj", h, (d, d)), (d, d))
        nodes.append(helper.make_node("Add", [h, o], [f"{p}.attn.res"]))
        h = f"{p}.attn.res"
        g, u = linear(f"{p}.mlp.gate_proj", h, (d, f)), linear(f"{p}.mlp.up_proj", h, (d, f))
        nodes.append(helper.make_node("Sigmoid", [g], [f"{p}.sig"]))
        nodes.append(helper.make_node("Mul", [g, f"{p}.sig"], [f"{p}.silu"]))
        nodes.append(helper.make_node("Mul", [f"{p}.silu", u], [f"{p}.hidden"]))
        down = linear(f"{p}.mlp.down_proj", f"{p}.hidden", (f, d))
        nodes.append(helper.make_node("Add", [h, down], [f"{p}.out"]))
        h = f"{p}.out"
    nodes.append(helper.make_node("Identity", [h], ["y"]))
    graph = helper.make_graph(nodes, "decoder", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, d])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, d])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def weights_of(proto) -> list[tuple[str, np.ndarray]]:
    from onnx import numpy_helper

    return [(t.name, numpy_helper.to_array(t)) for t in proto.graph.initializer]


def cuda_time(call, iters: int, blocks: int = 5) -> float:
    """Seconds per call: best block of ``iters`` calls, each block synchronized at its end."""
    import torch

    for _ in range(3):
        call()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(blocks):
        start = time.perf_counter()
        for _ in range(iters):
            call()
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - start) / iters)
    return best


def hbm_bandwidth_gbs(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth (bytes read + written), best of several copies."""
    import torch

    src = torch.ones(nbytes // 4, device="cuda")
    dst = torch.empty_like(src)
    return 2 * nbytes / cuda_time(lambda: dst.copy_(src), iters=10) / 1e9


def torch_runner(proto):
    """torch eager on the GPU, following the ONNX graph node by node (MatMul -> cuBLAS GEMV)."""
    import torch
    from onnx import numpy_helper

    values = {t.name: torch.from_numpy(numpy_helper.to_array(t)).cuda() for t in proto.graph.initializer}
    ops = {"MatMul": torch.matmul, "Add": torch.add, "Mul": torch.mul, "Sigmoid": torch.sigmoid,
           "Identity": lambda a: a}

    def run(x):
        env = dict(values, x=x)
        with torch.no_grad():
            for node in proto.graph.node:
                env[node.output[0]] = ops[node.op_type](*(env[i] for i in node.input))
        return env["y"]

    return run


def ort_gpu_runner(proto):
    """onnxruntime-gpu with I/O bound on the device, or None when its CUDA provider is missing."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return None
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CUDAExecutionProvider"])

    def run(x):
        binding = session.io_binding()
        binding.bind_input("x", "cuda", 0, np.float32, list(x.shape), x.data_ptr())
        binding.bind_output("y", "cuda")
        session.run_with_iobinding(binding)
        return binding

    return run


def bench_model(name: str, proto, arch: str, iters: int, workdir: Path) -> list[dict]:
    import torch

    import actsparse

    d = proto.graph.input[0].type.tensor_type.shape.dim[1].dim_value
    weight_bytes = sum(w.nbytes for _, w in weights_of(proto))
    x = torch.randn(1, d, device="cuda")
    rows = []
    torch_time = cuda_time(lambda: torch_runner(proto)(x), iters)
    rows.append({"model": name, "engine": "torch eager (cuBLAS)", "variant": "dense", "seconds": torch_time})
    ort_run = ort_gpu_runner(proto)
    ort_time = cuda_time(lambda: ort_run(x), iters) if ort_run else None
    if ort_time:
        rows.append({"model": name, "engine": "onnxruntime-gpu", "variant": "dense", "seconds": ort_time})
    calib = [{"x": np.random.default_rng(100 + i).standard_normal((1, d)).astype(np.float32)} for i in range(16)]
    for variant, passes in VARIANTS.items():
        start = time.perf_counter()
        artifact = actsparse.compile(proto, target=f"cuda:{arch}", passes=passes, calib=calib,
                                     example_inputs={"x": calib[0]["x"]}, output=workdir / f"{name}-{variant}")
        compile_s = time.perf_counter() - start
        model = actsparse.load(artifact.path, device="cuda")
        seconds = cuda_time(lambda: model.run(x=x), iters)  # includes the 1 x d output copy to the host
        rows.append({"model": name, "engine": "actsparse", "variant": variant, "seconds": seconds,
                     "compile_seconds": compile_s, "kernels": sorted({k["kernel"] for k in artifact.kernels})})
    for row in rows:
        row["weight_gbs"] = weight_bytes / row["seconds"] / 1e9
        row["vs_torch"] = torch_time / row["seconds"]
        row["vs_ort_gpu"] = ort_time / row["seconds"] if ort_time else None
        row["weight_bytes"] = weight_bytes
    return rows


def print_table(report: dict) -> None:
    print(f"{report['gpu']} ({report['arch']}), HBM copy {report['hbm_gbs']:.0f} GB/s, "
          f"weights {report['rows'][0]['weight_bytes'] / 1e6:.0f} MB per model")
    print(f"{'model':8} {'engine':22} {'variant':8} {'us/token':>9} {'GB/s':>7} {'of HBM':>7} {'vs torch':>8} {'vs ORT':>7}")
    for r in report["rows"]:
        ort = f"{r['vs_ort_gpu']:.2f}x" if r["vs_ort_gpu"] else "-"
        print(f"{r['model']:8} {r['engine']:22} {r['variant']:8} {r['seconds'] * 1e6:9.1f} {r['weight_gbs']:7.0f} "
              f"{r['weight_gbs'] / report['hbm_gbs']:7.0%} {r['vs_torch']:7.2f}x {ort:>7}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d", type=int, default=2048)
    parser.add_argument("--f", type=int, default=5632)
    parser.add_argument("--layers", type=int, default=4, help="at 2048 x 5632 fp32: 138 MB (FFN) per layer")
    parser.add_argument("--quick", action="store_true", help="fewer iterations")
    parser.add_argument("--output", type=Path, default=RESULTS / "cuda.json")
    args = parser.parse_args(argv)
    gpu, arch = gpu_or_exit()

    from actsparse.frontend.zoo import swiglu_stack

    iters = 20 if args.quick else 200
    report = {"gpu": gpu, "arch": arch, "hbm_gbs": hbm_bandwidth_gbs(), "d": args.d, "f": args.f,
              "layers": args.layers, "rows": []}
    with tempfile.TemporaryDirectory(prefix="bench-cuda-") as tmp:
        for name, proto in (("ffn", swiglu_stack(args.layers, args.d, args.f)),
                            ("decoder", decoder_stack(args.layers, args.d, args.f))):
            report["rows"] += bench_model(name, proto, arch, iters, Path(tmp))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
