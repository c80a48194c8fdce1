"""`actsparse bench LM.actsparse --generate`: prompt and decode tokens/s of a compiled causal LM
against the engines users pick, on the same model, prompt and thread count.

Baselines read the Hugging Face folder the artifact was compiled from (`--model`, or the folder
the manifest records): `torch` (transformers with its KV cache), `onnxruntime-genai[:fp32|int4]`
(its model builder) and `llama.cpp[:f32|f16|q8_0|q4_0]` (llama-cpp-python on a GGUF made by
llama.cpp's `convert_hf_to_gguf.py`, found through $CONVERT_HF_TO_GGUF). They are optional
packages, never the runtime's dependencies: `benchmarks/setup_generate_env.sh` builds an
environment with all of them. Engines run interleaved, one generation each per round, and the
ratios are medians of same-round ratios (the machine's speed drifts within a run).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from actsparse.errors import ActsparseError

BASELINE_PRECISIONS = {"torch": ("fp32",), "onnxruntime-genai": ("fp32", "int4"),
                       "llama.cpp": ("f32", "f16", "q8_0", "q4_0")}
DEFAULT_NEW_TOKENS = 64
INSTALL_HINT = {"torch": "pip install torch transformers",
                "onnxruntime-genai": "pip install onnxruntime-genai",
                "llama.cpp": "pip install llama-cpp-python; benchmarks/setup_generate_env.sh also fetches llama.cpp's "
                             "converter"}


class ArtifactEngine:
    """A loaded LanguageModel; times come from its own generation statistics."""

    def __init__(self, lm):
        self.lm = lm

    def run(self, prompt: list[int], new_tokens: int) -> tuple[float, float, int]:
        list(self.lm.generate(prompt, new_tokens, stop_tokens=[]))
        stats = self.lm.stats
        return stats.prompt_seconds, stats.decode_seconds, stats.decode_steps


class TorchEngine:
    def __init__(self, model, threads: int):
        import torch

        torch.set_num_threads(threads)
        self.model = model

    def run(self, prompt: list[int], new_tokens: int) -> tuple[float, float, int]:
        import torch

        with torch.no_grad():
            start = time.perf_counter()
            out = self.model(torch.tensor([prompt]), use_cache=True)
            token = int(out.logits[0, -1].argmax())
            prompt_seconds = time.perf_counter() - start
            start = time.perf_counter()
            cache = out.past_key_values
            for _ in range(new_tokens - 1):
                out = self.model(torch.tensor([[token]]), past_key_values=cache, use_cache=True)
                cache = out.past_key_values
                token = int(out.logits[0, -1].argmax())
            return prompt_seconds, time.perf_counter() - start, new_tokens - 1


class OnnxruntimeGenaiEngine:
    def __init__(self, folder: Path, work: Path, precision: str):
        import onnxruntime_genai as og

        out = work / f"ortgenai-{precision}"
        if not (out / "genai_config.json").is_file():
            done = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(folder), "-o",
                                   str(out), "-p", precision, "-e", "cpu"], capture_output=True, text=True)
            if done.returncode:
                raise RuntimeError(f"its model builder failed: {done.stderr.strip().splitlines()[-1:]}")
        self.og = og
        self.model = og.Model(str(out))

    def run(self, prompt: list[int], new_tokens: int) -> tuple[float, float, int]:
        import numpy as np

        og = self.og
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=len(prompt) + new_tokens, min_length=len(prompt) + new_tokens,
                                  do_sample=False)
        generator = og.Generator(self.model, params)
        start = time.perf_counter()
        generator.append_tokens(np.array(prompt, np.int32))
        generator.generate_next_token()
        prompt_seconds = time.perf_counter() - start
        start = time.perf_counter()
        steps = 0
        while not generator.is_done() and steps < new_tokens - 1:
            generator.generate_next_token()
            steps += 1
        return prompt_seconds, time.perf_counter() - start, steps


class LlamaCppEngine:
    def __init__(self, gguf: Path, threads: int, context: int = 2048):
        from llama_cpp import Llama

        # use_extra_bufts=False: its AMX repacking segfaulted on AMX CPUs (benchmarks/README.md)
        self.llm = Llama(model_path=str(gguf), n_ctx=context, n_threads=threads, n_batch=512, verbose=False,
                         use_extra_bufts=False)

    def run(self, prompt: list[int], new_tokens: int) -> tuple[float, float, int]:
        self.llm.reset()
        start = time.perf_counter()
        self.llm.eval(prompt)
        prompt_seconds = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(new_tokens - 1):
            token = self.llm.sample(temp=0.0)
            self.llm.eval([token])
        return prompt_seconds, time.perf_counter() - start, new_tokens - 1


def gguf_file(folder: Path, work: Path, kind: str) -> Path:
    """`folder` converted to GGUF (`kind`: f32, f16, q8_0, q4_0), cached in `work`."""
    converter = os.environ.get("CONVERT_HF_TO_GGUF")
    if not converter or not Path(converter).is_file():
        raise FileNotFoundError("set CONVERT_HF_TO_GGUF to llama.cpp's convert_hf_to_gguf.py")
    out = work / f"model-{kind}.gguf"
    if out.is_file():
        return out
    base = work / "model-f32.gguf" if kind in ("q8_0", "q4_0") else out
    if not base.is_file():
        gguf_py = Path(converter).parent / "gguf-py"  # the converter's own gguf package version
        env = os.environ | {"PYTHONPATH": os.pathsep.join(filter(None, [str(gguf_py), os.environ.get("PYTHONPATH")]))}
        done = subprocess.run([sys.executable, converter, str(folder), "--outfile", str(base),
                               "--outtype", "f32" if base != out else kind], capture_output=True, text=True, env=env)
        if done.returncode:
            raise RuntimeError(f"convert_hf_to_gguf failed: {done.stderr.strip().splitlines()[-1:]}")
    if base != out:
        import llama_cpp

        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = {"q8_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0, "q4_0": llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0}[kind]
        if llama_cpp.llama_model_quantize(str(base).encode(), str(out).encode(), params) != 0:
            raise RuntimeError(f"llama_model_quantize to {kind} failed")
    return out


def parse_baselines(text: str | None) -> list[tuple[str, str]]:
    """"torch,llama.cpp:q8_0" -> [("torch", "fp32"), ("llama.cpp", "q8_0")]; "none" or "" -> []."""
    baselines = []
    for item in (text or "").split(","):
        item = item.strip()
        if not item or item == "none":
            continue
        engine, _, precision = item.partition(":")
        if engine not in BASELINE_PRECISIONS:
            raise ActsparseError(f"--against {item}: unknown engine; expected {', '.join(BASELINE_PRECISIONS)} "
                                 "(optionally :precision), or none")
        precision = precision or BASELINE_PRECISIONS[engine][0]
        if precision not in BASELINE_PRECISIONS[engine]:
            raise ActsparseError(f"--against {item}: {engine} precisions are {', '.join(BASELINE_PRECISIONS[engine])}")
        baselines.append((engine, precision))
    return baselines


def model_folder(manifest: dict, given: str | None) -> Path:
    """The Hugging Face folder the baselines read: `given`, else the one the artifact was compiled from."""
    folder = Path(given) if given else Path(str(manifest.get("lm", {}).get("source", "")))
    if not (folder / "config.json").is_file():
        where = f"{given}: not a Hugging Face folder (no config.json)" if given else \
            "the artifact was not compiled from a Hugging Face folder on this machine"
        raise ActsparseError(f"--against needs the model's Hugging Face folder: {where}; give --model FOLDER")
    return folder


def baseline_engine(engine: str, precision: str, folder: Path, work: Path, threads: int, context: int):
    """One baseline, or an ActsparseError naming what to install."""
    try:
        if engine == "torch":
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(str(folder), torch_dtype="float32").eval()
            return TorchEngine(model, threads)
        if engine == "onnxruntime-genai":
            return OnnxruntimeGenaiEngine(folder, work, precision)
        import llama_cpp  # noqa: F401 (before converting anything)

        return LlamaCppEngine(gguf_file(folder, work, precision), threads, context)
    except (ImportError, FileNotFoundError) as exc:
        raise ActsparseError(f"--against {engine}: {exc} ({INSTALL_HINT[engine]})") from None
    except RuntimeError as exc:
        raise ActsparseError(f"--against {engine}:{precision}: {exc}") from None


def default_threads() -> int:
    """What the runtime's TVM thread pool uses, so every engine gets the same cores."""
    from actsparse.runtime.threads import physical_cores

    return int(os.environ.get("TVM_NUM_THREADS") or physical_cores())


def bench_generation(engines: dict, prompt: list[int], new_tokens: int, rounds: int, log=None) -> dict:
    """Interleaved rounds of one generation per engine; medians, and same-round ratios of the
    first engine (actsparse) to each other one."""
    samples: dict[str, list[dict]] = {name: [] for name in engines}
    for engine in engines.values():  # untimed: first-call setup (thread pools, allocations, page faults)
        engine.run(prompt, 2)
    for round_ in range(rounds):
        for name, engine in engines.items():
            prompt_s, decode_s, steps = engine.run(prompt, new_tokens)
            samples[name].append({"prompt_tps": len(prompt) / prompt_s, "decode_tps": steps / decode_s})
            if log:
                log(f"round {round_ + 1}/{rounds} {name}: prompt {len(prompt) / prompt_s:.1f} tok/s, "
                    f"decode {steps / decode_s:.1f} tok/s")
    ours = next(iter(engines))
    rows = []
    for name, runs in samples.items():
        row = {"engine": name, **{key: round(statistics.median(r[key] for r in runs), 2)
                                  for key in ("prompt_tps", "decode_tps")}}
        if name != ours:
            for key in ("prompt_tps", "decode_tps"):
                row[f"actsparse_{key.removesuffix('_tps')}_speedup"] = round(statistics.median(
                    a[key] / b[key] for a, b in zip(samples[ours], runs)), 3)
        rows.append(row)
    return {"prompt_tokens": len(prompt), "new_tokens": new_tokens, "rounds": rounds, "rows": rows}


def print_generation_bench(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("engine", "prompt tok/s", "decode tok/s", "actsparse prompt speed-up", "actsparse decode speed-up",
                  title=f"prompt {results['prompt_tokens']} tokens, {results['new_tokens']} new tokens, {results['threads']} "
                        f"threads, median of {results['rounds']} interleaved rounds")
    for row in results["rows"]:
        speedups = [row.get(f"actsparse_{key}_speedup") for key in ("prompt", "decode")]
        table.add_row(row["engine"], f"{row['prompt_tps']:.1f}", f"{row['decode_tps']:.1f}",
                      *("" if s is None else f"{s:.2f}x" for s in speedups))
    Console().print(table)


def bench_language_model(lm, against: str | None = None, model: str | None = None, *, prompt_tokens: int = 32,
                         new_tokens: int | None = None, rounds: int = 3, log=None) -> dict:
    """Time a loaded causal-LM artifact (`actsparse.load`) against the baselines (`parse_baselines`);
    results as `bench_generation`'s, with the thread count and the model folder. `new_tokens`:
    default 64, fewer where the artifact's context is shorter."""
    if not hasattr(lm, "generate"):
        raise ActsparseError("--generate needs a causal-LM artifact (compile one from a Hugging Face folder or a "
                             "transformers model)")
    if new_tokens is None:
        new_tokens = min(DEFAULT_NEW_TOKENS, lm.max_context - prompt_tokens)
    if prompt_tokens < 1 or new_tokens < 2:
        raise ActsparseError("--prompt-tokens must be >= 1 and --new-tokens >= 2")
    if prompt_tokens + new_tokens > lm.max_context:
        raise ActsparseError(f"--prompt-tokens + --new-tokens ({prompt_tokens + new_tokens}) exceed the artifact's "
                             f"context of {lm.max_context} (compile with a larger --max-context)")
    baselines = parse_baselines(against)
    threads = default_threads()
    engines = {"actsparse": ArtifactEngine(lm)}
    folder = model_folder(lm.manifest, model) if baselines else None
    for engine, precision in baselines:
        if log:
            log(f"preparing {engine}:{precision} ...")
        engines[f"{engine} {precision}"] = baseline_engine(engine, precision, folder, _work_folder(folder), threads,
                                                           prompt_tokens + new_tokens + 16)
    vocabulary = int(lm.manifest["lm"]["vocab_size"])
    prompt = [1 + (7919 * i) % (min(vocabulary, 1000) - 1) for i in range(prompt_tokens)]  # fixed, spread ids
    results = bench_generation(engines, prompt, new_tokens, rounds, log)
    return results | {"threads": threads, "model_folder": str(folder) if folder else None}


def _work_folder(folder: Path) -> Path:
    """Where converted baseline models are cached: one folder per model folder and weights version."""
    import hashlib

    stamp = hashlib.sha256(str(folder.resolve()).encode())
    for file in sorted(folder.glob("*.safetensors")) + [folder / "config.json"]:
        info = file.stat()
        stamp.update(f"{file.name}:{info.st_size}:{info.st_mtime_ns}".encode())
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "actsparse" / "bench-generate"
    work = root / stamp.hexdigest()[:16]
    work.mkdir(parents=True, exist_ok=True)
    return work
