"""LLM generation, batch 1: decode and prompt tokens/s of actsparse against the engines users pick.

    python benchmarks/bench_generate.py [--layers 32] [--rounds 3] [--new-tokens 128] [--engines ...]

Model: a Llama with the SmolLM-360M shape (hidden 960, intermediate 2560, 32 layers, 15 heads,
5 KV heads, vocab 49152, tied embeddings), random init with a fixed seed (speed does not depend on
the weight values; TEAL thresholds are still calibrated, on decode steps of built-in text), saved
as a Hugging Face folder that every engine reads. Prompt 32 tokens, `--new-tokens` greedy tokens,
2 threads. Engines run interleaved, one generation each per round; the table gives medians, and
ratios are medians of same-round ratios against onnxruntime (our decode-step ONNX with past K/V
inputs, in onnxruntime) and torch (transformers with its KV cache).

Optional engines, run when installed (`bash benchmarks/setup_generate_env.sh` builds an
environment with them; never the project's runtime dependencies):
- onnxruntime-genai (its model builder, fp32 and int4 block 32);
- llama.cpp through llama-cpp-python, on GGUF files from the `convert_hf_to_gguf.py` of its
  source distribution (f32, f16, q8_0, q4_0; opened with use_extra_bufts=False: AMX repacking
  segfaults on AMX CPUs, see benchmarks/README.md).

Decode at a long context: every actsparse engine also runs `--new-tokens` steps from position
`--long-context` (the cache's older entries are leftovers of earlier runs: the values do not change
the work), torch from a real prefill of that length.

Reported per engine: decode tok/s, prompt tok/s, weight bytes read per token (fp32/int8/int4 bytes
of every linear, times the fraction of rows its calibrated sparsity leaves; the embedding gather
reads one row), and that traffic as a share of this machine's read bandwidth (a two-thread read of
as many bytes, measured in the same rounds).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from actsparse.benchmark import generate as generation

HERE = Path(__file__).resolve().parent
SHAPE = dict(vocab_size=49152, hidden_size=960, intermediate_size=2560, num_attention_heads=15,
             num_key_value_heads=5, tie_word_embeddings=True, max_position_embeddings=2048, rms_norm_eps=1e-5)
ACTSPARSE_ENGINES = {
    "actsparse dense": None,
    "actsparse TEAL 40%": "sparsify{method=teal,sparsity=0.4}",
    "actsparse TEAL 50%": "sparsify{method=teal,sparsity=0.5}",
    "actsparse int8": "quantize{mode=dynamic,bits=8}",
    "actsparse int8 + TEAL 50%": "sparsify{method=teal,sparsity=0.5},quantize{mode=dynamic,bits=8}",
    # TEAL on the LM head's input too (scope=linears): the head is a quarter of int8's bytes a token
    "actsparse int8 + TEAL 50% (LM head too)": "sparsify{method=teal,sparsity=0.5,scope=linears},quantize{mode=dynamic,bits=8}",
    "actsparse int4 + TEAL 50%": "sparsify{method=teal,sparsity=0.5},quantize{mode=weight_only,bits=4}",
    "actsparse int8 (fp16 KV cache)": "quantize{mode=dynamic,bits=8}",
    "actsparse int8 + TEAL 50% (fp16 KV cache)": "sparsify{method=teal,sparsity=0.5},quantize{mode=dynamic,bits=8}",
}
KV_CACHE = {"actsparse int8 (fp16 KV cache)": "float16", "actsparse int8 + TEAL 50% (fp16 KV cache)": "float16"}  # the others keep the default float32 cache


def build_model(folder: Path, layers: int, seed: int = 0):
    import torch
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(**SHAPE, num_hidden_layers=layers)
    model = transformers.LlamaForCausalLM(config).eval()
    if not (folder / "config.json").is_file():
        model.save_pretrained(folder, safe_serialization=True)
    _write_tokenizer(folder)
    return model


def _write_tokenizer(folder: Path) -> None:
    """A SentencePiece tokenizer.model for llama.cpp's converter (it pads the vocabulary to the
    model's 49152): trained in a second on standard-library source. Speed does not depend on it."""
    if (folder / "tokenizer.model").is_file():
        return
    try:
        import sentencepiece as spm
    except ImportError:
        return  # only the llama.cpp engines need it
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    corpus = folder / "tokenizer-corpus.txt"
    corpus.write_text("\n".join(p.read_text(errors="replace") for p in sorted(root.glob("*.py"))[:40]))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(folder / "tokenizer"), vocab_size=2000,
                                   model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True,
                                   minloglevel=2)
    corpus.unlink()


# ------------------------------------------------------------------ engines
# Each engine: run(prompt, new_tokens) -> (prompt_seconds, decode_seconds, decode_steps) and
# long(context, new_tokens) -> decode seconds per token at that context (or None).


class ActsparseEngine(generation.ArtifactEngine):
    def __init__(self, folder: Path, passes: str | None, work: Path, max_context: int, kv_cache: str = "float32"):
        from actsparse.lm.compile import compile_causal_lm

        start = time.perf_counter()
        slug = (passes or "dense").replace("{", "_").replace("}", "").replace(",", "_").replace("=", "")
        slug += "" if kv_cache == "float32" else f"_kv{kv_cache}"
        self.artifact = compile_causal_lm(folder, "host", passes, output=work / f"{slug}.actsparse",
                                          max_context=max_context, kv_cache=kv_cache)
        self.compile_seconds = time.perf_counter() - start
        start = time.perf_counter()
        super().__init__(self.artifact.load())
        self.load_seconds = time.perf_counter() - start
        self.bytes_per_token = _bytes_per_token(self.artifact, self.lm)

    def long(self, context, new_tokens):
        self.lm.reset()
        self.lm.length = context  # leftover cache entries: same work as a real context of this length
        start = time.perf_counter()
        for i in range(new_tokens):
            self.lm.step(i + 1)
        return (time.perf_counter() - start) / new_tokens


def _bytes_per_token(artifact, lm) -> int:
    """Weight bytes one decode step reads: every parameter but the embedding table (one row
    gathered), less the rows each sparsified linear skips at its calibrated sparsity (in the
    stored precision: fp32 4 bytes, int8 1, int4 0.5 per weight)."""
    total = lm.weight_bytes - SHAPE["vocab_size"] * SHAPE["hidden_size"] * 4
    sparsify = next((r for r in artifact.records if r.name == "sparsify"), None)
    if sparsify is None:
        return total
    skipped_fp32 = sum(l["weight_bytes"] * l["calibrated_sparsity"] for l in sparsify.report["layers"])
    return int(total - skipped_fp32 * _bytes_per_weight(artifact) / 4)


def _bytes_per_weight(artifact) -> float:
    passes = {r.name: r.options for r in artifact.records}
    if "quantize" not in passes:
        return 4.0
    return 1.0 if passes["quantize"].get("bits", 8) == 8 else 0.5


class TorchEngine(generation.TorchEngine):
    """transformers with its KV cache; its long-context decode runs a real prefill of that length."""

    def __init__(self, model):
        super().__init__(model, threads=2)
        self.bytes_per_token = sum(p.numel() * 4 for n, p in model.named_parameters() if "embed" not in n) \
            + SHAPE["vocab_size"] * SHAPE["hidden_size"] * 4  # the tied lm_head reads the table once more

    def long(self, context, new_tokens):
        _, seconds, steps = self.run(list(np.arange(context) % 1000 + 1), new_tokens)
        return seconds / steps


class OnnxruntimeEngine:
    """Our decode-step ONNX (CachedAttention's function body concatenates the past) in onnxruntime."""

    def __init__(self, folder: Path):
        from actsparse.lm.compile import load_decoder
        from actsparse.ir.ort_session import ort_session

        spec, graph = load_decoder(folder, 2048)
        self.session = ort_session(graph, threads=2)
        # Its weights: the embedding table (one row gathered) out, its transposed copy as the LM head in.
        self.bytes_per_token = spec.weight_bytes()

    def run(self, prompt, new_tokens):
        from actsparse.lm.compile import ort_decode_steps

        start = time.perf_counter()
        steps = ort_decode_steps(self.session, prompt + [0] * new_tokens)
        for _ in prompt:
            next(steps)
        prompt_seconds = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(new_tokens - 1):
            next(steps)
        return prompt_seconds, time.perf_counter() - start, new_tokens - 1

    def long(self, context, new_tokens):
        return None  # the past grows through the graph: not this engine's comparison


def optional_engines(folder: Path, work: Path, wanted: set[str]) -> dict:
    engines, skipped = {}, {}
    for precision in ("fp32", "int4"):
        name = f"onnxruntime-genai {precision}"
        if name in wanted:
            try:
                engines[name] = generation.OnnxruntimeGenaiEngine(folder, work, precision)
            except Exception as exc:  # not installed, or its builder failed: say so in the results
                skipped[name] = f"{type(exc).__name__}: {str(exc)[:200]}"
    for kind in ("f32", "f16", "q8_0", "q4_0"):
        name = f"llama.cpp {kind}"
        if name in wanted:
            try:
                engines[name] = generation.LlamaCppEngine(generation.gguf_file(folder, work, kind), threads=2)
            except Exception as exc:
                skipped[name] = f"{type(exc).__name__}: {str(exc)[:200]}"
    return engines, skipped


# ------------------------------------------------------------------ main


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--long-context", type=int, default=1024)
    parser.add_argument("--long-prompt", type=int, default=512, help="also time a prompt this long (0: skip)")
    parser.add_argument("--engines", default="all", help="comma-separated engine names, or all")
    parser.add_argument("--work", default=str(HERE.parent / ".cache" / "bench-generate"))
    parser.add_argument("--json", default=str(HERE / "results" / "generate.json"))
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "2")

    work = Path(args.work)
    folder = work / f"smollm360m-shape-{args.layers}l"
    work.mkdir(parents=True, exist_ok=True)
    model = build_model(folder, args.layers)
    names = ["torch", "onnxruntime", *ACTSPARSE_ENGINES, "onnxruntime-genai fp32", "onnxruntime-genai int4",
             "llama.cpp f32", "llama.cpp f16", "llama.cpp q8_0", "llama.cpp q4_0"]
    wanted = set(names) if args.engines == "all" else {e.strip() for e in args.engines.split(",")}
    engines: dict = {}
    setup: dict = {}
    if "torch" in wanted:
        engines["torch"] = TorchEngine(model)
    if "onnxruntime" in wanted:
        engines["onnxruntime"] = OnnxruntimeEngine(folder)
    max_context = max(args.long_context + args.new_tokens, args.prompt_tokens + args.new_tokens,
                      args.long_prompt + 1) + 16
    for name, passes in ACTSPARSE_ENGINES.items():
        if name in wanted:
            print(f"compiling {name} ...", file=sys.stderr, flush=True)
            engine = ActsparseEngine(folder, passes, work, max_context, KV_CACHE.get(name, "float32"))
            engines[name] = engine
            setup[name] = {"compile_s": round(engine.compile_seconds, 1), "load_s": round(engine.load_seconds, 2),
                           "passes": passes}
    extra, skipped = optional_engines(folder, work, wanted)
    engines |= extra

    from benchmarks.common import read_bound_call

    dense_bytes = engines["actsparse dense"].bytes_per_token if "actsparse dense" in engines else 4 * sum(
        p.numel() for p in model.parameters())
    probe = read_bound_call(dense_bytes)
    prompt = list(range(1, args.prompt_tokens + 1))
    long_prompt = [1 + i % 1000 for i in range(args.long_prompt)]
    samples: dict[str, list[dict]] = {name: [] for name in engines}
    probe_gbs = []
    for round_ in range(args.rounds):
        for name, engine in engines.items():
            prompt_s, decode_s, steps = engine.run(prompt, args.new_tokens)
            long_s = engine.long(args.long_context, min(32, args.new_tokens)) if hasattr(engine, "long") else None
            long_prompt_s = engine.run(long_prompt, 1)[0] if long_prompt else None
            samples[name].append({"decode_tps": steps / decode_s, "prompt_tps": len(prompt) / prompt_s,
                                  "long_tps": 1 / long_s if long_s else None,
                                  "long_prompt_tps": len(long_prompt) / long_prompt_s if long_prompt_s else None})
            print(f"round {round_ + 1} {name}: decode {steps / decode_s:.1f} tok/s", file=sys.stderr, flush=True)
        start = time.perf_counter()
        for i in range(5):
            probe(i)
        probe_gbs.append(dense_bytes * 5 / (time.perf_counter() - start) / 1e9)
    bandwidth = statistics.median(probe_gbs)

    def ratio(name, base, key="decode_tps"):
        if base not in samples:
            return None
        return statistics.median(a[key] / b[key] for a, b in zip(samples[name], samples[base]))

    rows = []
    for name, runs in samples.items():
        decode = statistics.median(r["decode_tps"] for r in runs)
        bytes_per_token = getattr(engines[name], "bytes_per_token", None)
        long = [r["long_tps"] for r in runs if r["long_tps"]]
        rows.append({
            "engine": name, "decode_tps": round(decode, 2),
            "prompt_tps": round(statistics.median(r["prompt_tps"] for r in runs), 1),
            "prompt_tps_long": (round(statistics.median(r["long_prompt_tps"] for r in runs), 1)
                                if runs[0]["long_prompt_tps"] else None),
            "prompt_vs_onnxruntime_genai_fp32": _round(ratio(name, "onnxruntime-genai fp32", "prompt_tps")),
            "prompt_long_vs_onnxruntime_genai_fp32": (_round(ratio(name, "onnxruntime-genai fp32", "long_prompt_tps"))
                                                      if runs[0]["long_prompt_tps"] else None),
            "decode_tps_at_long_context": round(statistics.median(long), 2) if long else None,
            "vs_onnxruntime": _round(ratio(name, "onnxruntime")), "vs_torch": _round(ratio(name, "torch")),
            "vs_onnxruntime_genai_fp32": _round(ratio(name, "onnxruntime-genai fp32")),
            "weight_gb_per_token": round(bytes_per_token / 1e9, 4) if bytes_per_token else None,
            "share_of_read_bandwidth": round(bytes_per_token * decode / 1e9 / bandwidth, 3) if bytes_per_token else None,
            "decode_tps_rounds": [round(r["decode_tps"], 2) for r in runs],
            # decode speed-up over each baseline engine of the run: the median of same-round ratios
            "decode_vs": {base: _round(ratio(name, base)) for base in samples
                          if not base.startswith("actsparse") and base != name},
        })
    results = {"model": {"shape": SHAPE, "layers": args.layers, "seed": 0}, "prompt_tokens": args.prompt_tokens,
               "new_tokens": args.new_tokens, "long_context": args.long_context, "long_prompt": args.long_prompt,
               "rounds": args.rounds,
               "threads": 2, "read_bandwidth_gbs": round(bandwidth, 1), "machine": _machine(), "rows": rows,
               "setup": setup, "skipped": skipped}
    _print(results)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(results, indent=1) + "\n")
    return results


def _round(value):
    return round(value, 3) if value is not None else None


def _machine() -> dict:
    import platform

    from actsparse.benchmark.timing import l3_cache_bytes

    model = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                 platform.processor())
    return {"cpu": model, "cores": os.cpu_count(), "l3_mb": round((l3_cache_bytes() or 0) / 2**20)}


def _print(results: dict) -> None:
    print(f"\n{results['model']['layers']} layers, prompt {results['prompt_tokens']}, {results['new_tokens']} new "
          f"tokens, 2 threads, {results['rounds']} rounds; read bandwidth {results['read_bandwidth_gbs']} GB/s")
    print(f"| engine | decode tok/s | decode vs onnxruntime-genai fp32 | prompt tok/s ({results['prompt_tokens']} / "
          f"{results['long_prompt']}) | prompt vs onnxruntime-genai fp32 | decode tok/s at {results['long_context']} "
          "| GB read/token | share of read bandwidth |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results["rows"]:
        ratio = r.get("vs_onnxruntime_genai_fp32")
        prompt_ratio = "/".join("—" if v is None else f"{v}x" for v in (r.get("prompt_vs_onnxruntime_genai_fp32"),
                                                                        r.get("prompt_long_vs_onnxruntime_genai_fp32")))
        cells = [r["engine"], r["decode_tps"], None if ratio is None else f"{ratio}x",
                 f"{r['prompt_tps']} / {r.get('prompt_tps_long') or '—'}", prompt_ratio,
                 r["decode_tps_at_long_context"], r["weight_gb_per_token"], r["share_of_read_bandwidth"]]
        print("| " + " | ".join("—" if c is None else str(c) for c in cells) + " |")
    for name, why in results["skipped"].items():
        print(f"skipped {name}: {why}")
    for name, s in results["setup"].items():
        print(f"{name}: compiled in {s['compile_s']} s, loaded in {s['load_s']} s")


if __name__ == "__main__":
    sys.path.insert(0, str(HERE.parent))
    main()
