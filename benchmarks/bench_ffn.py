"""Does activation sparsity turn into speed? A Llama-style SwiGLU FFN stack at batch-1 decode.

Model: `swiglu_stack` (h += down(silu(gate(h)) * up(h)) per layer), D=1024, F=2816, fp32,
>= 4 layers (weights >= 4x the L3). In ONE run, on the same rotating inputs:

  onnxruntime dense | onnxruntime on the TEAL-sparsified ONNX | torch eager (2 threads) |
  TVM's default build of the dense ONNX (from_onnx + tvm.compile, none of our kernels) |
  actsparse dense (fused ffn_dense) and the same as per-linear kernels |
  actsparse TEAL 50 % (FFN input + down input; fused ffn_input_sparse) | the
  same with the per-linear sparse kernels | actsparse CATS 50 % | actsparse shifted-ReLU ~90 % sparse
  (relufy with a shift calibrated so 90 % of gate pre-activations fall below it) |
  the ffn_indexed kernel with the active set given up front (direct kernel calls, see below) |
  the read bound: a plain two-thread read of as many bytes as the dense weights (probe.read_sum),
  timed in the same rounds as each dense engine: its share of the read bound |
  sweeps over sparsity 0/0.3/0.5/0.7/0.9 (TEAL, shifted ReLU, indexed) + a linear fit of
  time against the fraction of weight bytes read |
  actsparse R-Sparse 50 % / 70 % (rsparse pass, batch-1 rank_sparse kernel per linear) at the bytes
  of TEAL 50 % / 70 %.

Engines whose reads fit in the cache rotate over several loaded copies (4x the L3 of bytes
actually read). GB/s counts the weight bytes an engine must read (all of them for the dense
engines; for sparse ones the fraction measured on the benchmark inputs with numpy); "% bw" is
that over a numpy copy probe measured in the same run (read + write bytes). Every engine is
timed in blocks alternating with onnxruntime dense (its default spinning pool), each block after
the other engine's thread pool has gone idle; a time is the best block, and "speed vs ORT dense"
is the median over blocks of onnxruntime's block time / the engine's block next to it, with the
quartiles (this machine's bandwidth drifts by tens of percent within a run: a ratio of best blocks
moved by 10 % between runs of the same artifact; the "onnxruntime dense" row, a second session
paired with the first, shows the noise floor). Writes benchmarks/results/ffn.json and ffn_speed_vs_sparsity.png.

    .venv/bin/python benchmarks/bench_ffn.py [--layers 4] [--quick] [--blocks 12]
    .venv/bin/python benchmarks/bench_ffn.py --only rsparse   # R-Sparse vs TEAL only -> ffn_rsparse.json
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import copy_bandwidth_gbs, l3_cache_bytes, read_bound_call, time_per_call  # noqa: E402

from actsparse.benchmark.timing import interleaved_blocks, paired_speedup  # noqa: E402

D, F = 1024, 2816
SPARSITIES = (0.0, 0.3, 0.5, 0.7, 0.9)
RELU_SPARSITIES = (0.3, 0.5, 0.7, 0.9)  # relu(g - b) with 0 % sparsity is linear: the stack blows up
CALIBRATION_SAMPLES = 16
BENCH_INPUTS = 8
MEMORY_BUDGET = 2_500_000_000  # bytes of weight copies one engine may hold
RESULTS = Path(__file__).resolve().parent / "results"
RSPARSE_LEVELS = (0.5, 0.7)
# Equal accuracy: the PPL-1 % sparsities of TEAL and R-Sparse on the in-repo mini LM's FFNs
# (benchmarks/results/lm_mini_rsparse.json), compiled on this stack and timed head to head.
EQUAL_ACCURACY = {"teal": 0.35, "rsparse": 0.8375}
# The bench's weights are random (a flat spectrum: the split search would spend everything on rows),
# and the speed depends only on the bytes read: half of the budget on rows, half on the rank.
RSPARSE_RATIO = 0.5
TARGETS = {  # the targets: speed vs onnxruntime dense (and bandwidth for dense)
    "actsparse dense": 1.1, "actsparse TEAL 50%": 1.9, "actsparse relu 90%": 2.3, "active set up front 90%": 6.0,
}


# ------------------------------------------------------------------------------ model + numpy

def stack_weights(proto, layers: int) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    from onnx import numpy_helper

    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    return [tuple(inits[f"layers.{i}.mlp.{n}_proj.weight"] for n in ("gate", "up", "down")) for i in range(layers)]


def silu(g):
    return g / (1.0 + np.exp(-g))


def simulate(x, weights, *, t_in=None, t_down=None, shift=None, cats=None):
    """numpy forward of the (sparsified) stack: (output, gate pre-activations per layer,
    per layer the fractions of weight bytes our kernels read)."""
    h = x.astype(np.float64)
    gates, fractions = [], []
    for i, (wg, wu, wd) in enumerate(weights):
        xs = np.where(np.abs(h) > t_in[i], h, 0) if t_in is not None else h
        g = xs @ wg
        gates.append(g)
        u = xs @ wu
        if shift is not None:
            a = np.maximum(g - shift, 0)
            active = float(np.mean(a > 0))
            fractions.append((1 + 2 * active) / 3)  # gate dense, up/down only where active
        else:
            a = silu(g)
            if cats is not None:
                a = np.where(np.abs(a) > cats[i], a, 0)
                fractions.append((1 + 2 * float(np.mean(a != 0))) / 3)
        hidden = a * u
        if t_down is not None:
            hidden = np.where(np.abs(hidden) > t_down[i], hidden, 0)
            fractions.append((2 * float(np.mean(xs != 0)) + float(np.mean(hidden != 0))) / 3)
        elif shift is None and cats is None:
            fractions.append(1.0)
        h = h + hidden @ wd
    return h.astype(np.float32), gates, fractions


def calibrate_shift(weights, inputs, sparsity: float) -> float:
    """The shift b of relu(g - b) for which `sparsity` of all gate pre-activations (pooled over
    layers, on the shifted model itself) are <= b: a few fixed-point rounds."""
    shift = 0.0
    for _ in range(5):
        gates = np.concatenate([np.concatenate(simulate(x, weights, shift=shift)[1], axis=None) for x in inputs])
        shift = float(np.quantile(gates, sparsity)) if sparsity > 0 else float(gates.min()) - 1.0
    return shift


def teal_thresholds(records, layers: int):
    """Per-layer (input, down) thresholds from the sparsify pass report."""
    t_in, t_down = [None] * layers, [None] * layers
    for entry in records[-1].report["layers"]:
        index = int(entry["linears"][0].split(".")[1])
        (t_down if "down_proj" in entry["linears"][0] else t_in)[index] = entry["threshold"]
    return t_in, t_down


def cats_thresholds(records, layers: int):
    return [next(e["threshold"] for e in records[-1].report["layers"] if e["name"].startswith(f"layers.{i}."))
            for i in range(layers)]


def rsparse_fraction(optimized, inputs) -> float:
    """Fraction of the stack's linear weight bytes the R-Sparse kernels read on `inputs`: per
    RankSparseMatMul, the kept rows of W (|x| * scale > t, measured) and all of A and B."""
    from actsparse.calibrate.stats import collect_values
    from actsparse.ir.custom_ops import is_rank_sparse_matmul

    model = optimized.model
    nodes = [n for n in model.graph if is_rank_sparse_matmul(n)]
    values = collect_values(model, [n.inputs[0].name for n in nodes], [{"x": x} for x in inputs])
    read = total = 0.0
    for node in nodes:
        threshold, scale, w, a = (v.const_value.numpy() for v in node.inputs[1:5])
        k, n = w.shape
        rank = a.shape[1]
        xs = np.concatenate([v.reshape(-1, k) for v in values[node.inputs[0].name]])
        kept = float(np.mean(np.abs(xs) * scale > threshold))
        read += kept * k * n + rank * (k + n)
        total += k * n
    return read / total


# ------------------------------------------------------------------------------ engines

def coprime_inputs(inputs: list, copies: int) -> list:
    """Trim the rotating inputs to a count coprime with the copies: each copy sees every input."""
    n = len(inputs)
    while n > 1 and math.gcd(n, copies) != 1:
        n -= 1
    return inputs[:n]


def copies_for(weight_bytes: int, fraction: float) -> int:
    """Loaded copies so that the bytes actually read rotate over >= 4x the L3."""
    needed = math.ceil(4 * l3_cache_bytes() / max(weight_bytes * fraction, 1))
    return max(1, min(needed, MEMORY_BUDGET // weight_bytes))


def time_artifact(path: Path, inputs, weight_bytes: int, fraction: float, iters: int,
                  timer=time_per_call) -> tuple[float, int, np.ndarray]:
    import actsparse

    copies = copies_for(weight_bytes, fraction)
    models = [actsparse.load(path) for _ in range(copies)]
    xs = coprime_inputs(inputs, copies)
    y0 = models[0].run(x=inputs[0])["y"]
    seconds = timer(lambda i: models[i % copies].run(x=xs[i % len(xs)]), iters)
    del models
    gc.collect()
    return seconds, copies, y0


def ort_session(proto, spinning: bool = True):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = os.cpu_count() or 1
    if not spinning:  # spinning workers lose badly when other processes want the cores
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


def time_ort(proto, inputs, iters: int, spinning: bool = True, timer=time_per_call) -> tuple[float, np.ndarray]:
    session = ort_session(proto, spinning)
    y0 = session.run(None, {"x": inputs[0]})[0]
    seconds = timer(lambda i: session.run(None, {"x": inputs[i % len(inputs)]}), iters)
    return seconds, y0


def time_torch(weights, inputs, iters: int, timer=time_per_call) -> tuple[float, np.ndarray]:
    import torch

    torch.set_num_threads(2)

    class SwiGLUStack(torch.nn.Module):
        """The same stack as the ONNX model: nn.Linear layers (weights [out, in]) without bias."""

        def __init__(self):
            super().__init__()
            self.layers = torch.nn.ModuleList()
            for wg, wu, wd in weights:
                layer = torch.nn.ModuleDict({
                    name: torch.nn.Linear(w.shape[0], w.shape[1], bias=False)
                    for name, w in (("gate", wg), ("up", wu), ("down", wd))
                })
                for name, w in (("gate", wg), ("up", wu), ("down", wd)):
                    layer[name].weight.data = torch.from_numpy(np.ascontiguousarray(w.T))
                self.layers.append(layer)

        def forward(self, h):
            for layer in self.layers:
                h = h + layer["down"](torch.nn.functional.silu(layer["gate"](h)) * layer["up"](h))
            return h

    module = SwiGLUStack().eval()
    xs = [torch.from_numpy(x) for x in inputs]
    with torch.inference_mode():
        y0 = module(xs[0]).numpy()
        seconds = timer(lambda i: module(xs[i % len(xs)]), iters)
    return seconds, y0


def time_tvm_default(proto, inputs, timer=None) -> tuple[float, np.ndarray]:
    """TVM's own pipeline on the dense ONNX (none of our kernels): very slow, so few iterations."""
    import tvm
    from tvm import relax
    from tvm.relax.frontend.onnx import from_onnx

    from actsparse.codegen.targets import resolve_target

    mod = from_onnx(proto, shape_dict={"x": [1, D]})
    executable = tvm.compile(mod, target=resolve_target("host"))
    vm = relax.VirtualMachine(executable, tvm.cpu())
    xs = [tvm.runtime.tensor(x) for x in inputs]
    y0 = vm["main"](xs[0]).numpy()
    call = lambda i: vm["main"](xs[i % len(xs)])  # noqa: E731
    seconds = timer(call, 2, blocks=2) if timer else time_per_call(call, iters=2, blocks=2, warmup=1)
    return seconds, y0


def time_indexed(weights, inputs, active: float, iters: int, timer=time_per_call) -> tuple[float, int]:
    """The ffn_indexed kernel per layer, chained (layer l's output is layer l+1's input, no
    residual add), the active set (random, `active` of the neurons) given up front."""
    import tvm

    from actsparse.codegen.kernels.cpu.build import build_kernel
    from actsparse.codegen.kernels.cpu.ffn import ffn_indexed, pack_ffn_indexed

    kernel = build_kernel(ffn_indexed(D, F, "silu"), "host").raw
    layer_bytes = 3 * D * F * 4
    copies = copies_for(layer_bytes * len(weights), active)
    packed = [pack_ffn_indexed(*w) for w in weights]
    sets = [[[tvm.runtime.tensor(a) for a in p] for p in packed] for _ in range(copies)]
    del packed
    rng = np.random.default_rng(7)
    nnz = max(1, int(round(F * active)))
    xs = coprime_inputs(inputs, copies)
    slots = []
    for _ in xs:
        per_layer = []
        for _ in weights:
            idx = np.zeros(F, np.int32)
            idx[:nnz] = np.sort(rng.choice(F, nnz, replace=False))
            per_layer.append((tvm.runtime.tensor(idx), tvm.runtime.tensor(np.array([nnz], np.int32))))
        slots.append(per_layer)
    x_tensors = [tvm.runtime.tensor(x) for x in xs]
    outs = [tvm.runtime.tensor(np.zeros((1, D), np.float32)) for _ in weights]

    def call(i):
        current, slot, weight_set = x_tensors[i % len(xs)], slots[i % len(xs)], sets[i % copies]
        for layer, (wgu, wd) in enumerate(weight_set):
            kernel(current, *slot[layer], wgu, wd, outs[layer])
            current = outs[layer]

    seconds = timer(call, iters)
    del sets
    gc.collect()
    return seconds, copies


# ------------------------------------------------------------------------------ driver

class Bench:
    def __init__(self, layers: int, iters: int, workdir: Path, blocks: int = 12):
        import actsparse
        from actsparse.frontend.zoo import swiglu_stack

        self.layers, self.iters, self.workdir, self.blocks = layers, iters, workdir, blocks
        self.proto = swiglu_stack(layers=layers, d=D, f=F)
        self.weights = stack_weights(self.proto, layers)
        self.weight_bytes = 3 * D * F * 4 * layers
        rng = np.random.default_rng(0)
        self.inputs = [rng.standard_normal((1, D)).astype(np.float32) for _ in range(BENCH_INPUTS)]
        self.calibration = [{"x": rng.standard_normal((1, D)).astype(np.float32)} for _ in range(CALIBRATION_SAMPLES)]
        self.rows: list[dict] = []
        self.actsparse = actsparse
        # The yardstick: onnxruntime dense with its default (spinning) pool, timed interleaved with
        # every engine (`paired`), so that each ratio comes from one stretch of this drifting machine.
        self.reference = ort_session(self.proto)
        self.paired_ort_seconds: float | None = None
        self.paired_speedup: tuple[float, float, float] | None = None
        # Dense engines are timed with the read probe in the same rounds (``paired(...,
        # read_bound=True)``): this machine's bandwidth swings by 2x between stretches, and
        # onnxruntime's time does not follow it, so a share taken through onnxruntime would not hold.
        self.read_bound = read_bound_call(self.weight_bytes)
        self.paired_read_share: float | None = None
        self.read_bound_seconds: list[float] = []

    def paired(self, call, iters: int, blocks: int | None = None, read_bound: bool = False) -> float:
        """Seconds per `call`, timed in blocks alternating with onnxruntime dense (kept for `add`);
        with ``read_bound``, the read probe runs in the same rounds too."""
        xs = self.inputs
        engines = {"onnxruntime": lambda i: self.reference.run(None, {"x": xs[i % len(xs)]}), "engine": call}
        if read_bound:
            engines["read bound"] = self.read_bound
        times = interleaved_blocks(engines, {name: iters for name in engines}, blocks or self.blocks)
        self.paired_ort_seconds = min(times["onnxruntime"])
        self.paired_speedup = paired_speedup(times["onnxruntime"], times["engine"])
        if read_bound:
            self.paired_read_share = paired_speedup(times["read bound"], times["engine"])[0]
            self.read_bound_seconds += times["read bound"]
        return min(times["engine"])

    def paired_with_read_bound(self, call, iters: int, blocks: int | None = None) -> float:
        return self.paired(call, iters, blocks, read_bound=True)

    def add(self, engine: str, seconds: float, *, fraction: float = 1.0, sparsity: float | None = None,
            sweep: str | None = None, error: float | None = None, **extra) -> dict:
        row = {"engine": engine, "ms": seconds * 1e3, "bytes_fraction": fraction, "sparsity": sparsity,
               "sweep": sweep, "max_abs_error": error, **extra}
        if self.paired_ort_seconds is not None:
            row["ort_dense_paired_ms"] = self.paired_ort_seconds * 1e3
            row["speed_vs_ort_dense"], row["speed_q25"], row["speed_q75"] = self.paired_speedup
            self.paired_ort_seconds = self.paired_speedup = None
        if self.paired_read_share is not None:
            row["share_of_read_bound"] = self.paired_read_share
            self.paired_read_share = None
        self.rows.append(row)
        print(f"  {engine:58s} {row['ms']:9.3f} ms  bytes read {fraction:5.2f}", flush=True)
        return row

    def optimize(self, passes: str):
        return self.actsparse.optimize(self.proto, passes=passes, calib=self.calibration)

    def compile(self, optimized, name: str, fused_ffn_forms=None) -> Path:
        """The artifact; `fused_ffn_forms`: only these fused FFN kernels (the others per linear)."""
        path = self.workdir / f"{name}.actsparse"
        if fused_ffn_forms is None:
            self.actsparse.compile(optimized.model, target="host", example_inputs={"x": self.inputs[0]}, output=path)
        else:
            from actsparse.codegen.compile import compile_model

            compile_model(optimized.model, "host", path, input_shapes={"x": self.inputs[0].shape},
                          fused_ffn_forms=fused_ffn_forms)
        return path

    def artifact(self, engine: str, optimized, name: str, fraction: float, reference: np.ndarray,
                 read_bound: bool = False, fused_ffn_forms=None, **extra):
        timer = self.paired_with_read_bound if read_bound else self.paired
        seconds, copies, y0 = time_artifact(self.compile(optimized, name, fused_ffn_forms), self.inputs,
                                            self.weight_bytes, fraction, self.iters, timer=timer)
        return self.add(engine, seconds, fraction=fraction, copies=copies,
                        error=float(np.abs(y0 - reference).max()), **extra)


def run(layers: int, iters: int, workdir: Path, blocks: int = 12) -> dict:
    from actsparse.codegen.lowering.ffn_fusion import GATE_SPARSE

    b = Bench(layers, iters, workdir, blocks)
    print(f"SwiGLU FFN stack: {layers} layers, D={D}, F={F}, weights {b.weight_bytes / 1e6:.0f} MB, "
          f"L3 {l3_cache_bytes() >> 20} MB", flush=True)
    bandwidth = copy_bandwidth_gbs()
    print(f"copy probe {bandwidth:.1f} GB/s", flush=True)
    dense_ref = simulate(b.inputs[0], b.weights)[0]

    t_ort, y = time_ort(b.proto, b.inputs, iters, timer=b.paired_with_read_bound)  # a second session: the noise floor
    b.add("onnxruntime dense", t_ort, error=float(np.abs(y - dense_ref).max()))
    t, _ = time_ort(b.proto, b.inputs, iters, spinning=False, timer=b.paired)
    b.add("onnxruntime dense, no spinning", t)
    t, y = time_torch(b.weights, b.inputs, iters, timer=b.paired_with_read_bound)
    b.add("torch eager (2 threads)", t, error=float(np.abs(y - dense_ref).max()))
    t, y = time_tvm_default(b.proto, b.inputs, timer=b.paired)
    b.add("TVM default build (from_onnx + tvm.compile)", t, error=float(np.abs(y - dense_ref).max()))
    b.artifact("actsparse dense", b.optimize("cleanup"), "dense", 1.0, dense_ref, read_bound=True)
    # the dense block as per-linear kernels instead of ffn_dense
    b.artifact("actsparse dense per-linear kernels", b.optimize("cleanup"), "dense_per_linear", 1.0, dense_ref,
               read_bound=True, fused_ffn_forms={GATE_SPARSE})

    # TEAL sweep (0.5 is the headline row); ORT on the 50 % ONNX; the fused input-sparse kernel at 50 %.
    for s in SPARSITIES:
        optimized = b.optimize(f"sparsify{{method=teal,sparsity={s},scope=ffn}}") if s > 0 else b.optimize("cleanup")
        t_in, t_down = teal_thresholds(optimized.records, layers) if s > 0 else (None, None)
        fractions = [simulate(x, b.weights, t_in=t_in, t_down=t_down)[2] for x in b.inputs]
        fraction = float(np.mean(fractions))
        reference = simulate(b.inputs[0], b.weights, t_in=t_in, t_down=t_down)[0]
        name = "actsparse TEAL 50%" if s == 0.5 else f"actsparse TEAL {s:.0%}"
        b.artifact(name, optimized, f"teal{s}", fraction, reference, sparsity=s, sweep="teal")
        if s == 0.5:
            t, y = time_ort(optimized.to_onnx(), b.inputs, iters, timer=b.paired)
            b.add("onnxruntime TEAL 50% ONNX", t, error=float(np.abs(y - reference).max()))
            # TEAL keeps the per-linear sparse kernels
            b.artifact("actsparse TEAL 50% per-linear sparse kernels", optimized, "teal_per_linear", fraction,
                       reference, sparsity=s, fused_ffn_forms={GATE_SPARSE})
        del optimized
        gc.collect()

    run_rsparse_levels(b)

    # CATS 50 %: fused ffn_gate_sparse with silu.
    optimized = b.optimize("cleanup,sparsify{method=cats,sparsity=0.5}")
    cats = cats_thresholds(optimized.records, layers)
    fraction = float(np.mean([simulate(x, b.weights, cats=cats)[2] for x in b.inputs]))
    b.artifact("actsparse CATS 50% (fused ffn_gate_sparse)", optimized, "cats", fraction,
               simulate(b.inputs[0], b.weights, cats=cats)[0], sparsity=0.5)

    # Shifted ReLU sweep (0.9 is the headline row): fused ffn_gate_sparse.
    calibration_inputs = [c["x"] for c in b.calibration]
    for s in RELU_SPARSITIES:
        shift = calibrate_shift(b.weights, calibration_inputs, s)
        hidden_active = [1 - 3 * (fr - 1 / 3) / 2 for x in b.inputs for fr in simulate(x, b.weights, shift=shift)[2]]
        fraction = float(np.mean([simulate(x, b.weights, shift=shift)[2] for x in b.inputs]))
        optimized = b.optimize(f"relufy{{act=shifted_relu,shift={shift:.6g}}}")
        name = "actsparse relu 90%" if s == 0.9 else f"actsparse relu {s:.0%}"
        b.artifact(name, optimized, f"relu{s}", fraction, simulate(b.inputs[0], b.weights, shift=float(f"{shift:.6g}"))[0],
                   sparsity=s, sweep="relu", shift=shift, measured_sparsity=float(np.mean(hidden_active)))
        del optimized
        gc.collect()

    # Active set given up front: the ffn_indexed kernel called directly (no graph path yet).
    for s in SPARSITIES:
        seconds, copies = time_indexed(b.weights, b.inputs, 1 - s, iters, timer=b.paired)
        name = "active set up front 90%" if s == 0.9 else f"active set up front {s:.0%}"
        b.add(name, seconds, fraction=1 - s, sparsity=s, sweep="indexed", copies=copies,
              note="ffn_indexed kernel called directly per layer (no residual add, random active set)")

    # Each speed is the median over blocks of onnxruntime dense's block time / the engine's next
    # block time (``paired``); the machine's bandwidth drifts by tens of percent over a run.
    bandwidth = max(bandwidth, copy_bandwidth_gbs())
    for row in b.rows:
        row["gbs"] = b.weight_bytes * row["bytes_fraction"] / (row["ms"] * 1e-3) / 1e9
        row["bandwidth_fraction"] = row["gbs"] / bandwidth
    return {
        "machine": {"cpus": os.cpu_count(), "arch": platform.machine(), "l3_bytes": l3_cache_bytes(),
                    "copy_bandwidth_gbs": bandwidth, "load_average_at_end": os.getloadavg(),
                    "read_bound_gbs_best_block": b.weight_bytes / min(b.read_bound_seconds) / 1e9,
                    "read_bound_gbs_median_block": b.weight_bytes / float(np.median(b.read_bound_seconds)) / 1e9},
        "model": {"layers": layers, "d": D, "f": F, "weight_bytes": b.weight_bytes},
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "rows": b.rows, "fits": linear_fits(b.rows, b.weight_bytes), "targets": check_targets(b.rows),
        "share_of_read_bound": read_bound_shares(b.rows),
    }


def run_rsparse_levels(b: Bench) -> None:
    """R-Sparse at each of RSPARSE_LEVELS (the same bytes read as TEAL at that level)."""
    for s in RSPARSE_LEVELS:
        optimized = b.optimize(f"rsparse{{sparsity={s},sparse_ratio={RSPARSE_RATIO},scope=ffn}}")
        fraction = rsparse_fraction(optimized, b.inputs)
        reference = ort_session(optimized.to_onnx()).run(None, {"x": b.inputs[0]})[0]
        b.artifact(f"actsparse R-Sparse {s:.0%}", optimized, f"rsparse{s}", fraction, reference, sparsity=s,
                   sweep="rsparse", sparse_ratio=RSPARSE_RATIO)
        del optimized
        gc.collect()


def run_rsparse_only(layers: int, iters: int, workdir: Path, blocks: int = 12) -> dict:
    """R-Sparse next to TEAL at the same levels (fused and per-linear kernels): each paired with
    onnxruntime dense, then the three artifacts of a level head to head (`head_to_head`): the
    comparison at equal bytes read."""
    from actsparse.codegen.lowering.ffn_fusion import GATE_SPARSE

    b = Bench(layers, iters, workdir, blocks)
    print(f"SwiGLU FFN stack: {layers} layers, D={D}, F={F}, weights {b.weight_bytes / 1e6:.0f} MB, "
          f"L3 {l3_cache_bytes() >> 20} MB", flush=True)
    for s in RSPARSE_LEVELS:
        optimized = b.optimize(f"sparsify{{method=teal,sparsity={s},scope=ffn}}")
        t_in, t_down = teal_thresholds(optimized.records, layers)
        fraction = float(np.mean([simulate(x, b.weights, t_in=t_in, t_down=t_down)[2] for x in b.inputs]))
        reference = simulate(b.inputs[0], b.weights, t_in=t_in, t_down=t_down)[0]
        b.artifact(f"actsparse TEAL {s:.0%}", optimized, f"teal{s}", fraction, reference, sparsity=s, sweep="teal")
        b.artifact(f"actsparse TEAL {s:.0%} per-linear sparse kernels", optimized, f"teal_per_linear{s}",
                   fraction, reference, sparsity=s, fused_ffn_forms={GATE_SPARSE})
    run_rsparse_levels(b)
    rows = {r["engine"]: r for r in b.rows}
    comparison = {}
    for s in RSPARSE_LEVELS:
        fraction = min(rows[f"actsparse R-Sparse {s:.0%}"]["bytes_fraction"], rows[f"actsparse TEAL {s:.0%}"]["bytes_fraction"])
        head = head_to_head(b, {"teal": workdir / f"teal{s}.actsparse", "teal_per_linear": workdir / f"teal_per_linear{s}.actsparse",
                                "rsparse": workdir / f"rsparse{s}.actsparse"}, fraction)
        print(f"  R-Sparse {s:.0%} head to head: {head}", flush=True)
        comparison.setdefault(f"{s:.0%}", {})["head_to_head"] = head
    comparison["equal accuracy"] = equal_accuracy(b)
    print(f"  equal accuracy (mini LM PPL-1 %): {comparison['equal accuracy']}", flush=True)
    for s in RSPARSE_LEVELS:
        rsparse, teal = rows[f"actsparse R-Sparse {s:.0%}"], rows[f"actsparse TEAL {s:.0%}"]
        per_linear = rows[f"actsparse TEAL {s:.0%} per-linear sparse kernels"]
        comparison[f"{s:.0%}"] |= {
            "rsparse_vs_teal_speed": round(rsparse["speed_vs_ort_dense"] / teal["speed_vs_ort_dense"], 3),
            "rsparse_vs_teal_per_linear_speed": round(rsparse["speed_vs_ort_dense"] / per_linear["speed_vs_ort_dense"], 3),
            "bytes_fraction": {"rsparse": round(rsparse["bytes_fraction"], 4), "teal": round(teal["bytes_fraction"], 4)},
            "speed_per_byte_vs_teal": round(rsparse["speed_vs_ort_dense"] * rsparse["bytes_fraction"]
                                            / (teal["speed_vs_ort_dense"] * teal["bytes_fraction"]), 3)}
    bandwidth = copy_bandwidth_gbs()
    for row in b.rows:
        row["gbs"] = b.weight_bytes * row["bytes_fraction"] / (row["ms"] * 1e-3) / 1e9
        row["bandwidth_fraction"] = row["gbs"] / bandwidth
    return {"machine": {"cpus": os.cpu_count(), "arch": platform.machine(), "l3_bytes": l3_cache_bytes(),
                        "copy_bandwidth_gbs": bandwidth, "load_average_at_end": os.getloadavg()},
            "model": {"layers": layers, "d": D, "f": F, "weight_bytes": b.weight_bytes},
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "rows": b.rows, "rsparse_vs_teal": comparison}


def equal_accuracy(b: Bench) -> dict:
    """TEAL and R-Sparse each at the sparsity where the mini LM's perplexity rises 1 %, head to head."""
    teal, rsparse = EQUAL_ACCURACY["teal"], EQUAL_ACCURACY["rsparse"]
    optimized = b.optimize(f"sparsify{{method=teal,sparsity={teal},scope=ffn}}")
    t_in, t_down = teal_thresholds(optimized.records, b.layers)
    teal_fraction = float(np.mean([simulate(x, b.weights, t_in=t_in, t_down=t_down)[2] for x in b.inputs]))
    paths = {"teal": b.compile(optimized, "teal_equal_accuracy")}
    optimized = b.optimize(f"rsparse{{sparsity={rsparse},sparse_ratio={RSPARSE_RATIO},scope=ffn}}")
    rsparse_fraction_read = rsparse_fraction(optimized, b.inputs)
    paths["rsparse"] = b.compile(optimized, "rsparse_equal_accuracy")
    return {"sparsity": dict(EQUAL_ACCURACY), "bytes_fraction": {"teal": round(teal_fraction, 4),
                                                                 "rsparse": round(rsparse_fraction_read, 4)},
            **head_to_head(b, paths, rsparse_fraction_read)}


def head_to_head(b: Bench, paths: dict[str, Path], fraction: float) -> dict:
    """The compiled artifacts of `paths` timed in alternating blocks against each other (no
    onnxruntime between them): each engine's speed relative to the first, median over blocks of
    the same-stretch ratios, with quartiles. onnxruntime's spinning pool reacts to the other load
    on this machine differently from our kernels, which made ratios through it swing 2x."""
    import actsparse

    copies = copies_for(b.weight_bytes, fraction)
    xs = coprime_inputs(b.inputs, copies)
    models = {name: [actsparse.load(path) for _ in range(copies)] for name, path in paths.items()}

    def caller(loaded):
        return lambda i: loaded[i % copies].run(x=xs[i % len(xs)])

    times = interleaved_blocks({name: caller(loaded) for name, loaded in models.items()},
                               {name: b.iters for name in models}, b.blocks)
    first = next(iter(paths))
    result = {"best_ms": {name: round(min(t) * 1e3, 3) for name, t in times.items()}}
    for name in list(paths)[1:]:
        median, q25, q75 = paired_speedup(times[first], times[name])
        result[f"{name}_vs_{first}"] = {"median": round(median, 3), "q25": round(q25, 3), "q75": round(q75, 3)}
    del models
    gc.collect()
    return result


def linear_fits(rows: list[dict], weight_bytes: int) -> dict:
    """time_ms ~ fixed + slope * bytes fraction per sweep; slope says the effective bandwidth."""
    fits = {}
    for sweep in ("teal", "relu", "indexed", "rsparse"):
        points = [(r["bytes_fraction"], r["ms"]) for r in rows if r.get("sweep") == sweep]
        if len(points) >= 2:
            slope, fixed = np.polyfit(*zip(*points), 1)
            fits[sweep] = {"fixed_ms": float(fixed), "ms_per_fraction": float(slope),
                           "slope_gbs": float(weight_bytes / (slope * 1e-3) / 1e9) if slope > 0 else None}
    return fits


def check_targets(rows: list[dict]) -> dict:
    by_engine = {r["engine"]: r for r in rows}
    out = {}
    for engine, target in TARGETS.items():
        speed = by_engine[engine]["speed_vs_ort_dense"]
        out[engine] = {"target_speed": target, "speed": round(speed, 3), "met": bool(speed >= target)}
    dense = by_engine["actsparse dense"]
    out["actsparse dense bandwidth"] = {"target_fraction": 0.9, "fraction": round(dense["bandwidth_fraction"], 3),
                                        "met": bool(dense["bandwidth_fraction"] >= 0.9)}
    return out


def read_bound_shares(rows: list[dict]) -> dict:
    """Each dense engine's speed as a share of the read probe's, median of the same-round ratios:
    what is left to gain by reading faster."""
    return {r["engine"]: round(r["share_of_read_bound"], 3) for r in rows if "share_of_read_bound" in r}


def print_table(report: dict) -> None:
    print(f"\n| engine | ms | ORT dense ms (paired) | speed vs ORT dense (median of pairs) | quartiles | GB/s "
          f"| % of bandwidth ({report['machine']['copy_bandwidth_gbs']:.1f} GB/s) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in report["rows"]:
        print(f"| {r['engine']} | {r['ms']:.3f} | {r['ort_dense_paired_ms']:.3f} | {r['speed_vs_ort_dense']:.2f}x | "
              f"{r['speed_q25']:.2f}-{r['speed_q75']:.2f} | {r['gbs']:.1f} | {100 * r['bandwidth_fraction']:.0f} % |")
    print("\nfits (time ~ fixed + slope x fraction of weight bytes read):")
    for sweep, fit in report["fits"].items():
        print(f"  {sweep}: {fit['fixed_ms']:.3f} ms + {fit['ms_per_fraction']:.3f} ms x fraction"
              f" (slope bandwidth {fit['slope_gbs'] or float('nan'):.1f} GB/s)")
    machine = report["machine"]
    print(f"\nspeed as a share of the read bound's, same rounds (1.00: reads as fast as a plain read; the read "
          f"bound ran at {machine['read_bound_gbs_median_block']:.1f} GB/s in its median block, "
          f"{machine['read_bound_gbs_best_block']:.1f} in its best):")
    for engine, share in report["share_of_read_bound"].items():
        print(f"  {engine}: {share:.2f}")
    print("\ntargets:")
    for name, t in report["targets"].items():
        print(f"  {name}: {t} -> {'met' if t['met'] else 'NOT met'}")


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    labels = {"teal": "actsparse TEAL (fused ffn_input_sparse)", "relu": "actsparse shifted ReLU (fused gate-sparse)",
              "indexed": "ffn_indexed, active set given (direct kernel)",
              "rsparse": "actsparse R-Sparse (rank_sparse kernel per linear)"}
    # x: the weight bytes actually skipped (measured), not the nominal sparsity: TEAL's overshoots
    # at high targets and the gate-sparse kernel always reads the whole gate.
    for sweep, label in labels.items():
        points = sorted((1 - r["bytes_fraction"], r["speed_vs_ort_dense"], r["sparsity"])
                        for r in report["rows"] if r.get("sweep") == sweep)
        if points:
            skipped, speed, nominal = zip(*points)
            ax.plot(skipped, speed, marker="o", label=label)
            for x, y, n in points:
                ax.annotate(f"{n:.0%}", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
    dense = next(r for r in report["rows"] if r["engine"] == "actsparse dense")["speed_vs_ort_dense"]
    s = np.linspace(0, 0.95, 60)
    ax.plot(s, dense / (1 - s), "k:", label="ideal: actsparse dense / bytes read")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_yscale("log")
    ax.set_xlabel("fraction of weight bytes skipped (measured; labels: nominal sparsity)")
    ax.set_ylabel("speed vs onnxruntime dense (x)")
    ax.set_title(f"SwiGLU FFN stack {report['model']['layers']}x (D={D}, F={F}), batch 1, fp32")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4, help="FFN blocks (>= 4; weights should be >= 4x the L3)")
    parser.add_argument("--quick", action="store_true", help="fewer iterations")
    parser.add_argument("--blocks", type=int, default=12,
                        help="timed blocks per engine, each alternating with onnxruntime dense")
    parser.add_argument("--output", type=Path, default=None, help="default: results/ffn.json (ffn_rsparse.json)")
    parser.add_argument("--only", choices=["rsparse"], default=None,
                        help="rsparse: only TEAL and R-Sparse at 50 %% / 70 %%, paired with onnxruntime dense")
    args = parser.parse_args(argv)
    if args.layers < 4:
        parser.error("--layers must be at least 4")
    iters = 10 if args.quick else 20
    if args.only == "rsparse":
        with tempfile.TemporaryDirectory(prefix="bench-ffn-") as workdir:
            report = run_rsparse_only(args.layers, iters, Path(workdir), args.blocks)
        output = args.output or RESULTS / "ffn_rsparse.json"
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(report, indent=2) + "\n")
        for level, entry in report["rsparse_vs_teal"].items():
            print(f"R-Sparse {level}: {entry}")
        print(f"wrote {output}")
        return 0
    args.output = args.output or RESULTS / "ffn.json"
    with tempfile.TemporaryDirectory(prefix="bench-ffn-") as workdir:
        report = run(args.layers, iters, Path(workdir), args.blocks)
    print_table(report)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    png = args.output.with_name(args.output.stem + "_speed_vs_sparsity.png")
    plot(report, png)
    print(f"\nwrote {args.output} and {png}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
