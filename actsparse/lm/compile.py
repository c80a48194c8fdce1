"""Compile a causal LM into a generation artifact: a one-token decode step over a KV cache.

    HF module / folder --read_causal_lm--> DecoderSpec --build_decode_graph--> decode ONNX
        --passes (calibrated on decode-step activations)--> --lower_cached_attention-->
        --compile_model--> artifact with a manifest "lm" section (+ the tokenizer, if any)

A second entry point, `prefill`, runs a chunk of PREFILL_TOKENS prompt tokens at once over the
same weights (frontend/decode_graph.build_prefill_graph, bound by codegen/lowering/prefill.py). The
runtime's `LanguageModel` (runtime/generate.py) owns the cache buffers, runs the prompt in chunks
and then the step once per new token.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx_ir as ir

from actsparse.errors import ActsparseError

CALIBRATION_STEPS = 64  # decode steps whose activations calibrate the thresholds
# Prompt tokens per prefill call: the dense kernel's 6-row tiles reach ~150 GFLOP/s at 32 rows
# (K=960, N=2560, 2 AVX-512 cores), where the weights' read, once per chunk, costs a sixth.
PREFILL_TOKENS = 32
CALIBRATION_SEQUENCES = 4


def load_decoder(model: Any, max_context: int | None):
    """(DecoderSpec, decode-step ir.Model) of a transformers module or Hugging Face folder."""
    from actsparse.frontend.causal_lm import read_causal_lm
    from actsparse.frontend.decode_graph import build_decode_graph

    if max_context is not None and max_context < 2:
        raise ActsparseError(f"max_context must be at least 2, got {max_context}")
    spec = read_causal_lm(model, max_context)
    return spec, build_decode_graph(spec)


def tokenizer_of(model: Any, tokenizer: str | os.PathLike | None) -> tuple[dict | None, dict[str, bytes]]:
    """The manifest's tokenizer entry and the files to pack: "bytes" (the in-repo LM's byte
    tokenizer), a tokenizer.json (or a folder holding one), else the model folder's own."""
    if tokenizer == "bytes":
        from actsparse.lm.data import BOS, EOS

        return {"kind": "bytes", "bos": BOS, "eos": EOS}, {}
    from actsparse.frontend.causal_lm import is_actsparse_lm_folder

    if tokenizer is None and isinstance(model, (str, os.PathLike)) and is_actsparse_lm_folder(Path(model)):
        return tokenizer_of(model, "bytes")  # the in-repo LM reads UTF-8 bytes
    candidates = []
    if tokenizer is not None:
        path = Path(tokenizer)
        candidates.append(path / "tokenizer.json" if path.is_dir() else path)
        if not candidates[0].is_file():
            raise ActsparseError(f"{tokenizer}: no tokenizer.json there")
    elif isinstance(model, (str, os.PathLike)):
        candidates.append(Path(model) / "tokenizer.json")
    for file in candidates:
        if file.is_file():
            data = file.read_bytes()
            _check_tokenizer(data, file)
            return {"kind": "huggingface", "file": "tokenizer/tokenizer.json"}, {"tokenizer/tokenizer.json": data}
    return None, {}


def _check_tokenizer(data: bytes, file: Path) -> None:
    try:
        from tokenizers import Tokenizer
    except ImportError:
        return  # checked on the device, where text in/out needs it
    try:
        Tokenizer.from_str(data.decode("utf-8"))
    except Exception as exc:
        raise ActsparseError(f"{file}: not a tokenizer the tokenizers library reads ({exc})") from None


def calibration_tokens(spec, tokenizer: dict | None, files: dict[str, bytes], calib_text: str | os.PathLike | None,
                       seed: int = 0, steps_total: int = CALIBRATION_STEPS) -> list[np.ndarray]:
    """Token sequences for calibration: `calib_text` (one sequence per paragraph), or by default a
    held-out file of the Python standard library's source; random ids when there is no tokenizer."""
    if calib_text is not None:
        path = Path(calib_text)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ActsparseError(f"{path}: cannot read calibration text ({exc})") from None
        if not text.strip():
            raise ActsparseError(f"{path}: calibration text is empty")
    else:
        text = _default_text()
    # Sequences of at most the context the model was read for (its rotary table's length).
    steps = min(steps_total // CALIBRATION_SEQUENCES + 1, spec.max_positions)
    count = max(CALIBRATION_SEQUENCES, -(-steps_total // max(1, steps - 1)))
    if tokenizer is None:
        if calib_text is not None:
            raise ActsparseError("--calib-text needs a tokenizer (a model folder with tokenizer.json, or --tokenizer)")
        rng = np.random.default_rng(seed)
        return [rng.integers(0, spec.vocab_size, steps) for _ in range(count)]
    from actsparse.runtime.tokenizer import make_tokenizer

    encode = make_tokenizer(tokenizer, files).encode
    chunks = [c for c in text.split("\n\n") if c.strip()] or [text]
    ids = np.concatenate([np.asarray(encode(c), np.int64) for c in chunks])
    if len(ids) < steps:
        ids = np.resize(ids, steps)
    starts = np.linspace(0, len(ids) - steps, count).astype(int)
    return [np.clip(ids[s:s + steps], 0, spec.vocab_size - 1) for s in starts]


def _default_text() -> str:
    from actsparse.lm.data import corpus_files

    files = corpus_files("heldout")
    return files[0].read_text(encoding="utf-8", errors="replace")[:20000] if files else "def f(x):\n    return x\n"


def ort_decode_steps(session, tokens):
    """Run a decode-step graph in onnxruntime token by token, its past grown from its present_*
    outputs: yields (feed, logits) per token. The reference every compiled step is checked against
    (tests, benchmarks) and the source of calibration activations."""
    names = [o.name for o in session.get_outputs()]
    past = {i.name: np.zeros((i.shape[0], 0, i.shape[2]), np.float32) for i in session.get_inputs()[2:]}
    for position, token in enumerate(tokens):
        feed = {"input_ids": np.array([[int(token)]], np.int64), "position": np.array([position], np.int64), **past}
        outputs = session.run(None, feed)
        yield feed, outputs[0]
        past = {name.replace("present_", "past_"): value for name, value in zip(names[1:], outputs[1:])}


def decode_feeds(model: ir.Model, sequences: list[np.ndarray]) -> list[dict[str, np.ndarray]]:
    """One feed per decode step of each sequence (teacher-forced through onnxruntime), so the
    thresholds see the activations the compiled decode step will see. The first step of each
    sequence sees an empty cache (no attention statistics worth keeping) and is left out."""
    from actsparse.ir.ort_session import ort_session

    session = ort_session(model)
    return [feed for tokens in sequences
            for position, (feed, _) in enumerate(ort_decode_steps(session, tokens)) if position]


def _chunk_spec(spec, records):
    """The spec the prompt chunk is built from: the model's, with the activation `relufy` put in
    the decode step (the chunk computes the model the step computes)."""
    from actsparse.passes.relufy import SMOOTH_KINDS

    relufy = next((record for record in reversed(records) if record.name == "relufy" and record.modified), None)
    if relufy is None or spec.activation not in SMOOTH_KINDS:  # OPT's ReLU stays
        return spec
    act = relufy.options.get("act", "relu")
    if act == "shifted_relu":
        act = f"shifted_relu:{float(relufy.options.get('shift', 0.0))!r}"
    return dataclasses.replace(spec, activation=act)


def compile_causal_lm(model: Any, target: str = "host", passes=None, *, output: str | os.PathLike | None = None,
                      max_context: int | None = None, calib_text: str | os.PathLike | None = None,
                      tokenizer: str | os.PathLike | None = None, recipe=None, verify: bool = True, seed: int = 0,
                      bundle_runtime: bool | str = False, on_pass=None, on_step: Callable[[str], None] | None = None,
                      calibration_steps: int = CALIBRATION_STEPS, kv_cache: str = "float32", on_sample=None):
    """The causal LM `model` compiled for `target` as a generation artifact (see the module docstring).
    `kv_cache`: the cache's element type, float32 (exact) or float16 (half the bytes a long
    context reads per token; keys and values rounded to float16, as llama.cpp's default cache)."""
    import tempfile

    from actsparse.api import CompiledArtifact, _accuracy_report, for_compile, resolve_passes
    from actsparse.codegen.compile import compile_model
    from actsparse.codegen.kernels.cpu.attention import cache_capacity
    from actsparse.codegen.kv_cache import lower_cached_attention
    from actsparse.passes.base import PassContext
    from actsparse.passes.pipeline import run_pipeline

    from actsparse.codegen.kernels.cpu.attention import CACHE_DTYPES

    step = on_step or (lambda message: None)
    if kv_cache not in CACHE_DTYPES:
        raise ActsparseError(f"kv_cache {kv_cache!r}: expected one of {', '.join(CACHE_DTYPES)}")
    if not 1 <= calibration_steps <= 1 << 16:
        raise ActsparseError(f"calibration steps must be in 1..65536, got {calibration_steps}")
    step("reading the model")
    spec, decode = load_decoder(model, max_context)
    tokenizer_entry, files = tokenizer_of(model, tokenizer)
    records = []
    specs = for_compile(resolve_passes(passes, recipe)) if (passes or recipe) else []
    if specs:
        step("calibrating on decode steps")
        sequences = calibration_tokens(spec, tokenizer_entry, files, calib_text, seed, calibration_steps)
        feeds = decode_feeds(decode, sequences)
        context = PassContext(calibration=feeds, seed=seed, on_sample=on_sample)
        decode, records = run_pipeline(decode, specs, context, verify=verify,
                                       on_pass=on_pass)
    max_context = spec.max_positions  # the default resolved: 2048 capped by the model's positions
    capacity = cache_capacity(max_context)
    window = spec.sliding_window if spec.sliding_window and spec.sliding_window < max_context else 0
    caches: list[dict] = []

    def prepare(graph: ir.Model) -> None:
        caches.extend(lower_cached_attention(graph, capacity, window, kv_cache))

    def companions(lowered: ir.Model) -> dict[str, ir.Model]:
        from actsparse.codegen.lowering.prefill import bind_prefill
        from actsparse.frontend.decode_graph import build_prefill_graph

        tokens = min(PREFILL_TOKENS, max_context)
        if tokens < 2 or target.strip().startswith("cuda"):
            lm["prefill"] = {"reason": "the prompt runs token by token on this target"}
            return {}
        chunk = build_prefill_graph(_chunk_spec(spec, records), tokens, capacity, window, kv_cache)
        reason = bind_prefill(chunk, lowered)
        if reason:
            step(f"prompt runs token by token: {reason}")
            lm["prefill"] = {"reason": reason}
            return {}
        lm["prefill"] = {"tokens": tokens}
        return {"prefill": chunk}

    lm = spec.describe() | {"max_context": max_context, "cache_capacity": capacity, "window": window, "kv_cache": kv_cache,
                            "tokenizer": tokenizer_entry, "source": spec.source,
                            "caches": caches}  # filled by prepare(), before the manifest is written
    if output is None:
        output = Path(tempfile.mkdtemp(prefix="actsparse-")) / "lm.actsparse"
    result = compile_model(decode, target, output, input_shapes={"input_ids": (1, 1), "position": (1,)},
                           passes=[r.to_json() for r in records], report=_accuracy_report(records),
                           bundle_runtime=bundle_runtime, on_step=on_step, copy=False, prepare=prepare,
                           extra_manifest={"lm": lm}, extra_files=files, companions=companions)
    return CompiledArtifact(result.path, result.target, result.kernels, records, result.seconds)
