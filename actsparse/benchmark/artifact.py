"""`actsparse bench`: time a compiled artifact against onnxruntime on the same rotating inputs.

Reports ms per run, the speed ratio, weight GB/s and its fraction of the memory bandwidth
measured by a numpy copy probe in the same run. A single artifact has one set of weights,
so its weights stay in cache when they are smaller than the last-level cache: the report
says so; the benchmarks/ scripts rotate several weight copies for cache-free figures.
"""

from __future__ import annotations

import numpy as np

from actsparse.benchmark.timing import copy_bandwidth_gbs, interleaved_blocks, l3_cache_bytes, paired_speedup

ROTATING_INPUTS = 8
BLOCKS = 7


def bench_artifact(model, onnx_path: str | None, *, iters: int = 50, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    feeds = [_random_feeds(model.inputs, rng) for _ in range(ROTATING_INPUTS)]
    weight_bytes = model.weight_bytes
    bandwidth = copy_bandwidth_gbs()
    engines = {"actsparse": lambda i: model.run(feeds[i % ROTATING_INPUTS])}
    if onnx_path:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        session = ort.InferenceSession(onnx_path, options, providers=["CPUExecutionProvider"])
        ort_feeds = [{k: v for k, v in f.items() if k in {i.name for i in session.get_inputs()}} for f in feeds]
        engines["onnxruntime"] = lambda i: session.run(None, ort_feeds[i % ROTATING_INPUTS])
    # Blocks alternate between the engines: this machine's bandwidth drifts within a run, and a
    # ratio means something only when both sides saw the same stretch of it.
    # The speed-up is the median of the per-block ratios (robust to one lucky block of either side).
    times = interleaved_blocks(engines, {name: iters for name in engines}, BLOCKS)
    rows = [{"engine": name, "seconds": min(block_times), "block_ms": [round(t * 1e3, 4) for t in block_times]}
            for name, block_times in times.items()]
    for row in rows:
        row["ms"] = round(row["seconds"] * 1e3, 4)
        row["speedup_vs_onnxruntime"] = (round(paired_speedup(times["onnxruntime"], times[row["engine"]])[0], 3)
                                         if onnx_path else None)
        row["weight_gbs"] = round(weight_bytes / row["seconds"] / 1e9, 2)
        row["fraction_of_bandwidth"] = round(row["weight_gbs"] / bandwidth, 3)
    return {
        "artifact_target": model.target, "weight_bytes": weight_bytes, "copy_bandwidth_gbs": round(bandwidth, 2),
        "weights_fit_in_cache": weight_bytes < l3_cache_bytes(), "rows": rows,
    }


def print_bench(results: dict) -> None:
    """`bench_artifact`'s results as a table on stdout, with what weight GB/s means."""
    from rich.console import Console
    from rich.table import Table

    # Two statistics, named as such: the time is each engine's best block, the speed ratio the
    # median of the blocks' paired ratios; 0.362 vs 0.360 ms can sit next to 1.99x without a label.
    table = Table("engine", "ms/run (best block)", "speed vs ORT (median of paired blocks)", "weight GB/s (best)",
                  "of bandwidth",
                  title=f"weights {results['weight_bytes'] / 1e6:.1f} MB, copy probe {results['copy_bandwidth_gbs']} GB/s")
    for row in results["rows"]:
        ratio = row["speedup_vs_onnxruntime"]
        table.add_row(row["engine"], f"{row['ms']:.3f}", f"{ratio:.2f}x" if ratio else "-",
                      f"{row['weight_gbs']:.1f}", f"{row['fraction_of_bandwidth']:.0%}")
    console = Console()
    console.print(table)
    console.print("weight GB/s: every weight byte of the model per run; a sparse model reads only the rows of "
                  "active inputs, so its figure can pass the bandwidth")
    if results["weights_fit_in_cache"]:
        console.print("[yellow]note:[/] the weights fit in the last-level cache; figures are cache-inflated "
                      "(benchmarks/ rotate weight copies for memory-bound numbers)")


def print_remote_bench(results: dict) -> None:
    """`actsparse bench --rpc`'s device-side timings (actsparse.deploy.rpc.time_on_board) as a table."""
    from rich.console import Console
    from rich.table import Table

    table = Table("device", "runs", "ms/run (median)", "ms (best)", "weight GB/s", title="remote timings (device side)")
    table.add_row(results["device"], str(results["runs"]), f"{results['ms_median']:.3f}", f"{results['ms_best']:.3f}",
                  str(results.get("weight_gbs", "-")))
    Console().print(table)


def _random_feeds(specs: list[dict], rng: np.random.Generator) -> dict[str, np.ndarray]:
    feeds = {}
    for spec in specs:
        shape = [d if isinstance(d, int) else 1 for d in spec["shape"]]
        dtype = np.dtype(spec["dtype"])
        if np.issubdtype(dtype, np.integer):
            feeds[spec["name"]] = rng.integers(0, 100, shape).astype(dtype)
        else:
            feeds[spec["name"]] = rng.standard_normal(shape).astype(dtype)
    return feeds
