"""The `actsparse` command: parse the arguments, call the API (`actsparse.optimize`, `compile`,
`load`, and the deploy and benchmark helpers), print.

Every user error ends as one line on stderr and exit status 2 (actsparse.command_guard);
outputs are written to a temp file and renamed, and the input is never overwritten.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from actsparse.command_guard import EXIT_USAGE, handled, run_command, run_crash_guarded
from actsparse.errors import ActsparseError
from actsparse.summary import CompileProgress, PassProgress, Spinner


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, not argparse's usage block
        self.exit(EXIT_USAGE, f"actsparse: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="actsparse", description="Compiler for activation-sparse, quantized inference.")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("inspect", help="summarize a model: ops, parameters, FFN/attention blocks, activations")
    p.add_argument("model", help="ONNX file")
    p.add_argument("--json", action="store_true", help="print JSON instead of tables")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("optimize", help="run a pass pipeline: ONNX in, ONNX out")
    p.add_argument("model", help="input ONNX file (never overwritten)")
    p.add_argument("-o", "--output", required=True, help="output ONNX file")
    _add_pipeline_args(p)
    p.add_argument("--report", help="write the passes, options and results as JSON (replays with --recipe)")
    p.set_defaults(func=cmd_optimize)

    p = sub.add_parser("compile", help="optimize and compile a model for a target into an artifact")
    p.add_argument("model", help="input ONNX file, or a causal LM folder (Hugging Face config.json + safetensors, "
                                 "or an actsparse.lm checkpoint) to compile for generation")
    p.add_argument("-o", "--output", required=True, help="artifact path (a directory, or a .tar file)")
    p.add_argument("--target", default="host",
                   help="host (default), x86, rpi4, aarch64, cuda[:sm_XX], or a JSON target")
    p.add_argument("--input-shape", action="append", default=[], metavar="NAME=D0xD1x...",
                   help="static shape for a dynamic input, e.g. input_ids=1x128 (repeatable)")
    p.add_argument("--bundle-runtime", nargs="?", const=True, default=False, metavar="LIBTVM_RUNTIME_SO",
                   help="put libtvm_runtime.so inside the artifact (this machine's, or the given file: "
                        "for rpi4, the aarch64 one from scripts/arm/build_userland.sh)")
    p.add_argument("--report", help="write the pass and compile report as JSON")
    p.add_argument("--max-context", type=int, default=None,
                   help="causal LMs: tokens the KV cache holds (default 2048, capped by the model's positions)")
    p.add_argument("--kv-cache", choices=("float32", "float16"), default=None,
                   help="causal LMs: the KV cache's element type (default float32; float16 halves the bytes a "
                        "long context reads per token)")
    p.add_argument("--sign", metavar="KEY", help="sign the artifact with this private key (from `actsparse keygen`)")
    _add_pipeline_args(p)
    p.set_defaults(func=cmd_compile)

    p = sub.add_parser("keygen", help="make an Ed25519 key pair for signing artifacts (PREFIX.key, PREFIX.pub)")
    p.add_argument("-o", "--output", required=True, metavar="PREFIX", help="writes PREFIX.key (mode 0600) and PREFIX.pub")
    p.set_defaults(func=cmd_keygen)

    p = sub.add_parser("sign", help="sign an artifact (directory or .tar) in place with a private key")
    p.add_argument("artifact", help="artifact directory or .tar")
    p.add_argument("--key", required=True, help="private key (PREFIX.key from `actsparse keygen`)")
    p.set_defaults(func=cmd_sign)

    from actsparse.runtime.generate_command import add_generate_arguments

    p = sub.add_parser("generate", help="generate text (or token ids) with a compiled causal-LM artifact")
    add_generate_arguments(p)
    _add_trust_arg(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("run", help="run a compiled artifact (needs only numpy + apache-tvm-ffi)")
    p.add_argument("artifact", help="artifact directory or .tar")
    p.add_argument("--inputs", help=".npz with one array per input name (default: random inputs)")
    p.add_argument("-o", "--output", help="write the outputs to this .npz (default: print a summary)")
    p.add_argument("--seed", type=int, default=0, help="seed for random inputs")
    _add_trust_arg(p)
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("bench", help="time a compiled artifact against onnxruntime on the same inputs "
                                      "(a causal LM: tokens/s against torch, onnxruntime-genai, llama.cpp)")
    p.add_argument("artifact", help="artifact directory or .tar")
    _add_trust_arg(p)
    p.add_argument("--against", help="baselines: onnxruntime (default), none; with --generate: any of torch, "
                                     "onnxruntime-genai[:fp32|int4], llama.cpp[:f32|f16|q8_0|q4_0] (default none)")
    p.add_argument("--generate", action="store_true", help="time token generation (implied for a causal-LM artifact)")
    p.add_argument("--model", help="with --generate: the Hugging Face folder the baselines read (default: the one "
                                   "the artifact was compiled from)")
    p.add_argument("--prompt-tokens", type=int, default=32, help="with --generate: prompt length (default 32)")
    p.add_argument("--new-tokens", type=int, help="with --generate: tokens generated (default 64, or what the "
                                                  "artifact's context leaves)")
    p.add_argument("--rounds", type=int, default=3, help="with --generate: interleaved rounds (default 3)")
    p.add_argument("--onnx", help="ONNX model onnxruntime runs (default: the model the artifact was compiled from)")
    p.add_argument("--iters", type=int, default=50, help="runs per timing block (default 50)")
    p.add_argument("--json", dest="json_out", help="also write the results as JSON")
    p.add_argument("--rpc", metavar="HOST:PORT", help="time on a remote board over TVM RPC (device-side timings)")
    _add_rpc_auth_args(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("deploy", help="upload an artifact to a board over TVM RPC, verify, run, compare")
    p.add_argument("artifact", help="artifact directory or .tar")
    p.add_argument("--rpc", required=True, metavar="HOST:PORT", help="the board's RPC server (python -m actsparse.deploy.server)")
    _add_rpc_auth_args(p)
    p.add_argument("--inputs", help=".npz inputs (default: the inputs packed with the reference, else random, seeded)")
    p.add_argument("--reference", help="ONNX model whose onnxruntime outputs the board must match (default: the "
                                       "optimized model the artifact was compiled from, whose outputs on fixed "
                                       "inputs compile packs into the artifact; with --inputs/--seed, or for an "
                                       "artifact without them, the source model if unchanged since compile)")
    p.add_argument("--atol", type=float, default=None,
                   help="allowed max abs error against the reference (default 1e-4; 3x the max abs error the "
                        "artifact's accuracy report measured when comparing with the source model of approximate "
                        "passes; for int8/int4 kernels, which skip the graph's activation rounding, 3x the error "
                        "the quantize pass caused)")
    p.add_argument("--timeout", type=float, default=10.0, help="connection timeout in seconds")
    p.add_argument("--seed", type=int, default=None,
                   help="random inputs from this seed instead of the packed ones (default: the packed inputs, else 0)")
    p.set_defaults(func=cmd_deploy)

    p = sub.add_parser("example", help="write a built-in example model (ONNX) to try the tool on")
    p.add_argument("name", choices=["swiglu", "gelu_mlp", "lm"],
                   help="swiglu: Llama-style FFN stack; gelu_mlp: BERT-style; lm: the in-repo Llama-architecture "
                        "byte-level LM, briefly trained on the Python standard library (a folder to compile)")
    p.add_argument("-o", "--output", required=True, help="output ONNX file (lm: output folder)")
    p.add_argument("--size", default="mini", help="lm: tiny, mini (default) or small")
    p.add_argument("--train-steps", type=int, default=400, help="lm: training steps (default 400, ~30 s on 2 cores)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d", type=int, default=1024, help="model width (default 1024)")
    p.add_argument("--f", type=int, default=2816, help="FFN width (default 2816)")
    p.add_argument("--tokens", type=int, default=1, help="rows of the input (default 1: batch-1 decode)")
    p.set_defaults(func=cmd_example)

    p = sub.add_parser("measure", help="PPL-p%%: per method, the highest FFN sparsity whose perplexity rises "
                                       "at most p%% (causal byte-level LMs, e.g. actsparse.lm)")
    p.add_argument("model", help="ONNX causal LM: input_ids [1, L] -> logits")
    p.add_argument("--ppl-tolerance", default="1%", help="allowed perplexity rise (1%% or 0.01)")
    p.add_argument("--methods", default="teal,wina,chess", help="comma-separated sparsify methods")
    p.add_argument("--out", default=".", help="folder for ppl_tolerance.json and .png")
    p.set_defaults(func=cmd_measure)

    p = sub.add_parser("passes", help="list the passes with their options")
    p.add_argument("name", nargs="?", help="show one pass in full")
    p.set_defaults(func=cmd_passes)
    return parser


def _add_rpc_auth_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--key", default="", help="RPC session key")
    p.add_argument("--token-file", help="the secret of a server started with --token-file (challenge-response)")


def _add_trust_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust", action="append", default=[], metavar="PUB",
                   help="refuse the artifact unless this public key signed it (repeatable; default: "
                        "$ACTSPARSE_TRUSTED_KEYS, else unsigned artifacts load)")


def _apply_trust(args) -> None:
    """--trust PUB: every load in this command must find a signature by one of these keys."""
    if getattr(args, "trust", None):
        from actsparse.runtime.signing import trust_in_this_process

        trust_in_this_process(args.trust)


def _add_pipeline_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--passes", help='pipeline, e.g. "relufy,sparsify{method=teal,sparsity=0.5}" (default: cleanup)')
    p.add_argument("--recipe", help="YAML/JSON recipe (or an optimize --report file)")
    p.add_argument("--calib", help=".npz of named inputs (default: generated from the input signature)")
    p.add_argument("--calib-text", help="text file: one calibration sample per line (needs --tokenizer); for a "
                                        "causal LM, text whose decode steps calibrate the thresholds")
    p.add_argument("--tokenizer", help="Hugging Face tokenizer folder for --calib-text; for a causal LM, the "
                                       "tokenizer.json to pack (default: the model folder's) or 'bytes'")
    # None = not given: a recipe's recorded calibration settings apply, else the defaults.
    p.add_argument("--samples", type=int, default=None, help="generated calibration samples (default 8); for a "
                                                               "causal LM, decode steps calibrated on (default 64)")
    p.add_argument("--seq-len", type=int, default=None, help="sequence length for generated inputs (default 16)")
    p.add_argument("--seed", type=int, default=None, help="seed for generated calibration data (default 0)")
    p.add_argument("--no-verify", action="store_true", help="skip onnx.checker/onnxruntime checks after each pass")


def main(argv: list[str] | None = None, *, crash_guard: bool | None = None) -> int:
    """The `actsparse` command. `crash_guard` (default: on for the console command, i.e. when
    `argv` is None; off for in-process calls) runs `compile` in a forked child, so that a crash
    of the native compiler becomes one line and exit status 2 (see `run_crash_guarded`)."""
    def work() -> int:
        args = build_parser().parse_args(argv)
        _apply_trust(args)
        guarded = crash_guard if crash_guard is not None else argv is None
        if guarded and args.func is cmd_compile:
            return run_crash_guarded(lambda: handled(lambda: args.func(args)), getattr(args, "output", None))
        return args.func(args) or 0

    return run_command(work)


# --- inspect / optimize / compile -------------------------------------------------------

def cmd_inspect(args) -> int:
    from actsparse.frontend.onnx_file import load_model
    from actsparse.ir.graph import name_unnamed_nodes
    from actsparse.summary import model_summary, print_model_summary

    model = load_model(args.model)
    name_unnamed_nodes(model)  # the names passes and reports give unnamed layers, for overrides=
    summary = model_summary(model)
    if args.json:
        import json

        print(json.dumps(summary, indent=2))
    else:
        print_model_summary(args.model, summary)
    return 0


def cmd_optimize(args) -> int:
    import actsparse
    from actsparse.atomic import write_json_atomic
    from actsparse.summary import print_records

    _refuse_overwriting_input(args)
    _check_writable_folder(args.report, "--report")
    settings = _calibration_settings(args)
    with PassProgress("optimizing") as progress:
        result = actsparse.optimize(args.model, passes=args.passes, recipe=args.recipe, **_calibration_args(settings),
                                    verify=not args.no_verify, on_pass=progress.on_pass, on_sample=progress.on_sample)
    result.save(args.output, source=args.model)
    if args.report:
        write_json_atomic(args.report, result.report() | {"input": str(args.model), "output": str(args.output),
                                                          "calibration": settings})
    print_records(result.records)
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


def cmd_compile(args) -> int:
    import actsparse
    from actsparse.frontend.causal_lm import is_causal_lm

    _refuse_overwriting_input(args)
    if args.sign:  # a bad key fails now, not after minutes of compiling
        from actsparse.runtime.signing import load_private_key

        load_private_key(args.sign)
    if is_causal_lm(args.model):
        return _compile_lm(args)
    if args.max_context is not None or args.kv_cache is not None:
        option = "--max-context" if args.max_context is not None else "--kv-cache"
        raise ActsparseError(f"{option} is for causal-LM folders; this model is an ONNX file")
    shapes = dict(_parse_shape(text) for text in args.input_shape)
    _check_writable_folder(args.report, "--report")
    # Calibration settings matter only when passes run (they are checked only then).
    settings = _calibration_settings(args, check=bool(args.passes or args.recipe))
    with CompileProgress() as display:
        art = actsparse.compile(args.model, args.target, args.passes, output=args.output, recipe=args.recipe,
                                input_shapes=shapes, **_calibration_args(settings), verify=not args.no_verify,
                                bundle_runtime=args.bundle_runtime, on_pass=display.on_pass,
                                on_sample=display.on_sample, on_optimized=display.on_optimized, on_step=display.on_step)
    return _finish_compile(args, "", art)


def _compile_lm(args) -> int:
    import actsparse
    from actsparse.summary import print_records

    if args.calib or args.input_shape:
        raise ActsparseError("a causal LM is calibrated on decode steps: use --calib-text, not --calib/--input-shape")
    _check_writable_folder(args.report, "--report")
    with PassProgress("optimizing") as progress, Spinner() as step:
        art = actsparse.compile(args.model, args.target, args.passes, output=args.output, recipe=args.recipe,
                                max_context=args.max_context, calib_text=args.calib_text, tokenizer=args.tokenizer,
                                verify=not args.no_verify, seed=args.seed or 0, bundle_runtime=args.bundle_runtime,
                                on_pass=progress.on_pass, on_step=step, samples=args.samples,
                                kv_cache=args.kv_cache, on_sample=progress.on_sample)
    print_records(art.records)
    return _finish_compile(args, "the decode step ", art)


def _finish_compile(args, what: str, art) -> int:
    """The end of `compile`, for ONNX models and causal LMs alike: kernel counts, the --report
    JSON, --sign, and the path written."""
    from actsparse.atomic import write_json_atomic

    kernels = Counter(layer["kernel"] for layer in art.kernels)
    print(f"compiled {what}for {args.target} in {art.seconds['total']:.1f}s; linear kernels: "
          + (", ".join(f"{k} x{v}" for k, v in kernels.items()) or "none"), file=sys.stderr)
    if args.report:
        write_json_atomic(args.report, {"passes": [r.to_json() for r in art.records], "target": art.target,
                                        "kernels": art.kernels, "seconds": art.seconds})
    if args.sign:
        from actsparse.runtime.signing import sign_artifact

        print(f"signed with key {sign_artifact(art.path, args.sign)}", file=sys.stderr)
    print(f"wrote {art.path}", file=sys.stderr)
    return 0


def _refuse_overwriting_input(args) -> None:
    from actsparse.frontend.onnx_file import same_file

    if same_file(Path(args.output), Path(args.model)):
        raise ActsparseError(f"{args.output}: refusing to overwrite the input model; choose another -o")


def _check_writable_folder(path: str | None, flag: str) -> None:
    """Fail before the work, not after it, when an output's folder is missing."""
    if path:
        folder = Path(path).parent
        if not folder.is_dir():
            raise ActsparseError(f"{flag} {path}: folder {folder} does not exist")


# Generated calibration is for quick runs: more samples than this belong in a --calib file.
MAX_GENERATED_SAMPLES = 4096
MAX_SEQUENCE_LENGTH = 1 << 20


def _calibration_settings(args, check: bool = True) -> dict:
    """The calibration flags, with a replayed report's recorded settings for those not given, and
    the defaults for the rest (actsparse.api); checked when `check`."""
    from actsparse.api import calibration_settings

    settings = calibration_settings(args.recipe, samples=args.samples, seq_len=args.seq_len, seed=args.seed,
                                    calib=args.calib, calib_text=args.calib_text, tokenizer=args.tokenizer)
    if not check:
        return settings
    if not 1 <= settings["samples"] <= MAX_GENERATED_SAMPLES:
        raise ActsparseError(f"--samples {settings['samples']}: expected 1 to {MAX_GENERATED_SAMPLES}")
    if not 1 <= settings["seq_len"] <= MAX_SEQUENCE_LENGTH:
        raise ActsparseError(f"--seq-len {settings['seq_len']}: expected 1 to {MAX_SEQUENCE_LENGTH}")
    if not 0 <= settings["seed"] < 2**64:
        raise ActsparseError(f"--seed {settings['seed']}: expected 0 to 2**64 - 1")
    if (settings["calib_text"] or settings["tokenizer"]) and (
            not (settings["calib_text"] and settings["tokenizer"]) or settings["calib"]):
        raise ActsparseError("--calib-text needs --tokenizer, and neither goes with --calib")
    return settings


def _calibration_args(settings: dict) -> dict:
    """The settings as the API's keyword arguments."""
    return {"calib": settings["calib"], "calib_text": settings["calib_text"] or None,
            "tokenizer": settings["tokenizer"] or None, "samples": settings["samples"],
            "sequence_length": settings["seq_len"], "seed": settings["seed"]}


def cmd_keygen(args) -> int:
    from actsparse.runtime.signing import generate_keypair

    private, public = generate_keypair(args.output)
    print(f"wrote {private} (private: keep it secret) and {public} (give it to devices: --trust {public})",
          file=sys.stderr)
    return 0


def cmd_sign(args) -> int:
    from actsparse.runtime.signing import sign_artifact

    print(f"signed {args.artifact} with key {sign_artifact(args.artifact, args.key)}", file=sys.stderr)
    return 0


def cmd_generate(args) -> int:
    from actsparse.runtime.generate_command import generate_command

    return generate_command(args)


def _parse_shape(text: str) -> tuple[str, tuple[int, ...]]:
    name, eq, dims = text.partition("=")
    try:
        shape = tuple(int(d) for d in dims.lower().split("x")) if eq and name else None
    except ValueError:
        shape = None
    if not shape or any(d <= 0 for d in shape):
        raise ActsparseError(f"--input-shape {text!r}: expected NAME=D0xD1x..., e.g. input_ids=1x128")
    return name, shape


def cmd_run(args) -> int:
    from actsparse.runtime.run_command import run_artifact_command

    return run_artifact_command(args.artifact, args.inputs, args.output, args.seed)


def cmd_deploy(args) -> int:
    from actsparse.deploy.commands import deploy_command

    return deploy_command(args)


def cmd_bench(args) -> int:
    from actsparse.atomic import write_json_atomic
    from actsparse.runtime import load

    model = None if args.rpc else load(args.artifact)  # over RPC the board loads it
    if args.rpc:
        from actsparse.deploy.commands import bench_remote_command

        results = bench_remote_command(args)
    elif args.generate or hasattr(model, "generate"):
        from actsparse.benchmark.generate import bench_language_model, print_generation_bench

        results = bench_language_model(model, args.against, args.model, prompt_tokens=args.prompt_tokens,
                                       new_tokens=args.new_tokens, rounds=args.rounds,
                                       log=lambda line: print(line, file=sys.stderr, flush=True))
        print_generation_bench(results)
    else:
        baselines = [b.strip() for b in (args.against or "onnxruntime").split(",") if b.strip() and b.strip() != "none"]
        unknown = [b for b in baselines if b != "onnxruntime"]
        if unknown:
            raise ActsparseError(f"--against {','.join(unknown)}: only onnxruntime can run an ONNX file; "
                                 "torch baselines live in benchmarks/ (they need the torch model)")
        onnx_path = args.onnx or model.manifest.get("report", {}).get("source")
        if baselines and (not onnx_path or not Path(onnx_path).exists()):
            raise ActsparseError("no ONNX model for the onnxruntime baseline: give --onnx model.onnx")
        from actsparse.benchmark.artifact import bench_artifact, print_bench

        results = bench_artifact(model, onnx_path if baselines else None, iters=args.iters)
        print_bench(results)
    if args.json_out:
        write_json_atomic(args.json_out, results)
    return 0


def cmd_example(args) -> int:
    import onnx_ir as ir

    from actsparse.frontend.onnx_file import save_model
    from actsparse.frontend.zoo import EXAMPLES

    if args.name == "lm":
        from actsparse.lm.train import example_lm

        metrics = example_lm(args.output, size=args.size, steps=args.train_steps)
        print(f"wrote {args.output} (actsparse.lm {args.size}, {metrics['parameters']:,} parameters, trained "
              f"{metrics['step']} steps, held-out perplexity {metrics['heldout_perplexity']:.2f})", file=sys.stderr)
        return 0
    if min(args.layers, args.d, args.f, args.tokens) <= 0:
        raise ActsparseError("--layers, --d, --f and --tokens must be positive")
    proto = EXAMPLES[args.name](layers=args.layers, d=args.d, f=args.f, tokens=args.tokens)
    save_model(ir.serde.deserialize_model(proto), args.output)
    print(f"wrote {args.output} ({args.name}, {args.layers} layers, d={args.d}, f={args.f})", file=sys.stderr)
    return 0


def cmd_measure(args) -> int:
    from actsparse.lm.perplexity import main as measure_main

    return measure_main([args.model, "--ppl-tolerance", args.ppl_tolerance, "--methods", args.methods,
                         "--out", args.out])


# --- passes ----------------------------------------------------------------------------

def cmd_passes(args) -> int:
    from actsparse.summary import print_passes

    print_passes(args.name)
    return 0


def _version() -> str:
    from actsparse import __version__

    return f"actsparse {__version__}"


if __name__ == "__main__":
    sys.exit(main())
