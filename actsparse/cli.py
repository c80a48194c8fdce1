"""`actsparse inspect|optimize|passes|compile|run|bench`.

Every user error ends as one line on stderr and exit status 2; outputs are written
to a temp file and renamed, and the input is never overwritten.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from pathlib import Path

from actsparse.errors import ActsparseError

EXIT_USAGE = 2


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

    p = sub.add_parser("bench", help="time a compiled artifact against onnxruntime on the same inputs")
    p.add_argument("artifact", help="artifact directory or .tar")
    _add_trust_arg(p)
    p.add_argument("--against", default="onnxruntime", help="baselines: onnxruntime (default), none")
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


class Terminated(BaseException):
    """SIGTERM, raised inside the running command so that its cleanup (`finally`, temp
    files) runs as for Ctrl-C. A BaseException: no `except Exception` may swallow it."""


# The signal this run received, if any: a library may turn the exception a signal raises
# inside it into one of its own errors, which must still read as the interruption it is.
_received: list[int] = []


def _on_sigterm(signum, frame):
    _received.append(143)
    raise Terminated()


def _on_sigint(signum, frame):
    _received.append(130)
    raise KeyboardInterrupt()


def _interrupted_message(status: int) -> str:
    what = "terminated" if status == 143 else "interrupted"
    return f"actsparse: {what}; no partial output was left"


def main(argv: list[str] | None = None, *, crash_guard: bool | None = None) -> int:
    """The `actsparse` command. `crash_guard` (default: on for the console command, i.e. when
    `argv` is None; off for in-process calls) runs `compile` in a forked child, so that a crash
    of the native compiler becomes one line and exit status 2 (see `run_crash_guarded`)."""
    _received.clear()
    previous = _handle_sigterm(_on_sigterm)
    previous_int = _handle_signal("SIGINT", _on_sigint)
    try:
        def work() -> int:
            args = build_parser().parse_args(argv)
            _apply_trust(args)
            guarded = crash_guard if crash_guard is not None else argv is None
            if guarded and args.func is cmd_compile:
                return run_crash_guarded(lambda: handled(lambda: args.func(args)), getattr(args, "output", None))
            return args.func(args) or 0

        return handled(work)
    finally:
        _handle_sigterm(previous)
        _handle_signal("SIGINT", previous_int)


def handled(work) -> int:
    """`work()`'s exit status, every exception turned into one line on stderr and a status."""
    try:
        return work() or 0
    except ActsparseError as exc:
        print(f"actsparse: error: {one_line(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("actsparse: interrupted; no partial output was left", file=sys.stderr)
        return 130
    except Terminated:
        print("actsparse: terminated; no partial output was left", file=sys.stderr)
        return 143
    except Exception as exc:  # a bug, not the user's input: still one line unless asked
        if _received:  # raised by the interruption, inside a library that re-wrapped it
            print(_interrupted_message(_received[0]), file=sys.stderr)
            return _received[0]
        if os.environ.get("ACTSPARSE_DEBUG"):
            raise
        print(f"actsparse: internal error: {type(exc).__name__}: {one_line(str(exc).splitlines()[0]) if str(exc) else ''} "
              f"(set ACTSPARSE_DEBUG=1 for a traceback)", file=sys.stderr)
        return 1


def run_crash_guarded(work, output: str | None = None) -> int:
    """Run `work()` (which returns an exit status) in a forked child and return its status.

    No input may kill the command without a word: if the child dies of a signal (TVM or LLVM
    overflowing their stack on a pathological graph, a bad kernel), this says so in one line,
    removes the half-written temp files beside `output`, and raises ActsparseError (exit 2).
    SIGINT reaches the child directly (same process group); a SIGTERM sent to this process is
    passed on to it. Without fork (not POSIX), `work()` runs here.
    """
    import signal

    if not hasattr(os, "fork"):
        return work()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never return into the caller's stack
        status = 1
        try:
            status = work()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
    forward = lambda signum, frame: os.kill(pid, signum)  # noqa: E731
    previous_term = _handle_signal("SIGTERM", forward)
    previous_int = _handle_signal("SIGINT", signal.SIG_IGN)  # the child gets it and reports
    try:
        while True:
            try:
                _, status = os.waitpid(pid, 0)
                break
            except InterruptedError:
                continue
    finally:
        _handle_signal("SIGTERM", previous_term)
        _handle_signal("SIGINT", previous_int)
    if os.WIFSIGNALED(status):
        name = signal.Signals(os.WTERMSIG(status)).name
        _remove_staging(output)
        raise ActsparseError(f"the compiler crashed on this model ({name}); nothing was written. Please report it "
                             "with the model (set ACTSPARSE_DEBUG=1 to see where)")
    return os.WEXITSTATUS(status)


def _remove_staging(output: str | None) -> None:
    """The temp files and folders a killed writer leaves beside its destination."""
    import shutil

    if not output:
        return
    destination = Path(output)
    for leftover in destination.parent.glob(f".{destination.name}.*tmp*"):
        shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)


def one_line(text: str) -> str:
    """`text` with line breaks and other control characters escaped: names from a hostile file
    (a tar member called "\\r", a path with a newline) must not break the one-line error or
    drive the terminal."""
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


def _handle_sigterm(handler):
    """Install `handler` for SIGTERM and return the previous one (None off the main thread,
    where Python cannot set signal handlers)."""
    return _handle_signal("SIGTERM", handler)


def _handle_signal(name: str, handler):
    import signal
    import threading

    if handler is None or threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(getattr(signal, name), handler)


# --- inspect ---------------------------------------------------------------------------

def cmd_inspect(args) -> int:
    from actsparse.frontend.onnx_file import load_model
    from actsparse.ir.graph import name_unnamed_nodes

    model = load_model(args.model)
    name_unnamed_nodes(model)  # the names passes and reports give unnamed layers, for overrides=
    summary = model_summary(model)
    if args.json:
        import json

        print(json.dumps(summary, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    console = Console()
    header = _safe(args.model, style="bold")
    header.append(f"  opset {summary['opset']}  {summary['parameters']:,} parameters "
                  f"({summary['parameter_bytes'] / 1e6:.1f} MB)  {summary['nodes']} nodes")
    console.print(header)
    io = Table("kind", "name", "dtype", "shape", title="inputs / outputs")
    for kind in ("inputs", "outputs"):
        for item in summary[kind]:
            io.add_row(kind[:-1], _safe(item["name"]), item["dtype"], _safe(item["shape"]))
    console.print(io)
    ops = Table("op", "count", title="ops")
    for op, count in summary["ops"].items():
        ops.add_row(_safe(op), str(count))
    console.print(ops)
    blocks = Table("block", "kind", "activation", "linears (in x out)", title="blocks found")
    for block in summary["ffn_blocks"] + summary["attention_blocks"]:
        blocks.add_row(_safe(block["name"]), block["kind"], block.get("activation", ""), _safe(", ".join(block["linears"])))
    console.print(blocks)
    console.print(f"linear layers: {summary['linears']}  activations: {summary['activations'] or 'none'}")
    return 0


def _safe(value, style: str = ""):
    """Text from a model file for the terminal: control characters escaped (a name with ESC or a
    newline must not drive the terminal or break the table) and never read as rich markup."""
    from rich.text import Text

    return Text(one_line(str(value)), style=style)


def model_summary(model) -> dict:
    import onnx_ir as ir

    from actsparse.calibrate.data import model_inputs
    from actsparse.ir.activations import match_activation
    from actsparse.ir.blocks import find_blocks

    ops = Counter()
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        ops[f"{node.domain}.{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type] += 1
    params = [v.const_value for v in model.graph.initializers.values() if v.const_value is not None]
    blocks = find_blocks(model)
    # The Sigmoid inside x*Sigmoid(x) is an activation too: count the largest match only.
    matches = [act for act in map(match_activation, model.graph) if act is not None]
    activations, covered = Counter(), set()
    for act in sorted(matches, key=lambda a: -len(a.nodes)):
        if not covered.intersection(map(id, act.nodes)):
            covered.update(map(id, act.nodes))
            activations[act.kind] += 1

    def describe(linear):
        return f"{linear.name} ({linear.in_features}x{linear.out_features})"

    def io(value):
        return {"name": value.name, "dtype": str(value.dtype) if value.dtype else "?",
                "shape": [d if isinstance(d, int) else str(d) for d in value.shape] if value.shape is not None else None}

    return {
        "opset": model.opset_imports.get("", None),
        "nodes": sum(ops.values()),
        "parameters": int(sum(p.size for p in params)),
        "parameter_bytes": int(sum(p.nbytes for p in params)),
        "inputs": [io(v) for v in model_inputs(model)],
        "outputs": [io(v) for v in model.graph.outputs],
        "ops": dict(ops.most_common()),
        "linears": len(blocks.linears),
        "ffn_blocks": [
            {"name": b.name, "kind": b.kind, "activation": b.activation.kind,
             "linears": [describe(l) for l in (b.gate, b.up, b.down) if l is not None]}
            for b in blocks.ffn
        ],
        "attention_blocks": [
            {"name": b.name, "kind": "attention",
             "linears": list(dict.fromkeys(describe(l) for l in (b.q, b.k, b.v, b.o) if l is not None))}
            for b in blocks.attention
        ],
        "activations": dict(activations),
    }


# --- optimize --------------------------------------------------------------------------

def cmd_optimize(args) -> int:
    from actsparse.api import OptimizeResult, record_accuracy, resolve_passes, write_json_atomic
    from actsparse.frontend.onnx_file import _same_file, load_model, save_model
    from actsparse.passes.base import PassContext
    from actsparse.passes.pipeline import run_pipeline

    if _same_file(Path(args.output), Path(args.model)):
        raise ActsparseError(f"{args.output}: refusing to overwrite the input model; choose another -o")
    _check_writable_folder(args.report, "--report")
    specs = resolve_passes(args.passes, args.recipe)
    _apply_recipe_calibration(args)
    model = load_model(args.model)
    calibration = _calibration(model, args)
    with _progress("optimizing") as progress:
        context = PassContext(calibration=calibration, seed=args.seed, on_sample=progress.on_sample)
        model, records = run_pipeline(model, specs, context, verify=not args.no_verify, on_pass=progress.on_pass)
    record_accuracy(model, records)
    result = OptimizeResult(model, records)
    save_model(model, args.output, source=args.model)
    if args.report:
        report = result.report() | {"input": str(args.model), "output": str(args.output),
                                    "calibration": _calibration_settings(args)}
        write_json_atomic(args.report, report)
    print_records(records)
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


def _check_writable_folder(path: str | None, flag: str) -> None:
    """Fail before the work, not after it, when an output's folder is missing."""
    if path:
        folder = Path(path).parent
        if not folder.is_dir():
            raise ActsparseError(f"{flag} {path}: folder {folder} does not exist")


CALIBRATION_DEFAULTS = {"samples": 8, "seq_len": 16, "seed": 0}


def _calibration_settings(args) -> dict:
    return {"samples": args.samples, "seq_len": args.seq_len, "seed": args.seed, "calib": args.calib,
            "calib_text": args.calib_text, "tokenizer": args.tokenizer}


def _apply_recipe_calibration(args) -> None:
    """A replayed report brings the calibration settings it was made with; flags given now win."""
    recorded = {}
    if args.recipe:
        import yaml

        try:
            data = yaml.safe_load(Path(args.recipe).read_text())
        except Exception:
            data = None
        if isinstance(data, dict) and isinstance(data.get("calibration"), dict):
            recorded = data["calibration"]
    for key, default in CALIBRATION_DEFAULTS.items():
        if getattr(args, key) is None:
            value = recorded.get(key, default)
            setattr(args, key, value if isinstance(value, int) and not isinstance(value, bool) else default)
    for key in ("calib", "calib_text", "tokenizer"):
        if getattr(args, key) is None and isinstance(recorded.get(key), str):
            setattr(args, key, recorded[key])


# Generated calibration is for quick runs: more samples than this belong in a --calib file.
MAX_GENERATED_SAMPLES = 4096
MAX_SEQUENCE_LENGTH = 1 << 20


def _calibration(model, args):
    from actsparse.api import calibration_for

    if not 1 <= args.samples <= MAX_GENERATED_SAMPLES:
        raise ActsparseError(f"--samples {args.samples}: expected 1 to {MAX_GENERATED_SAMPLES}")
    if not 1 <= args.seq_len <= MAX_SEQUENCE_LENGTH:
        raise ActsparseError(f"--seq-len {args.seq_len}: expected 1 to {MAX_SEQUENCE_LENGTH}")
    if not 0 <= args.seed < 2**64:
        raise ActsparseError(f"--seed {args.seed}: expected 0 to 2**64 - 1")
    if args.calib_text or args.tokenizer:
        if not (args.calib_text and args.tokenizer) or args.calib:
            raise ActsparseError("--calib-text needs --tokenizer, and neither goes with --calib")
        from actsparse.calibrate.text import text_calibration

        return text_calibration(model, args.calib_text, args.tokenizer, num_samples=args.samples,
                                sequence_length=args.seq_len)
    return calibration_for(model, args.calib, samples=args.samples, seed=args.seed, sequence_length=args.seq_len)


def print_records(records) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("pass", "options", "changed", "cosine", "max abs err", "details", title="passes (accuracy vs the input model)")
    for r in records:
        acc = r.vs_original
        table.add_row(
            r.name, _safe(",".join(f"{k}={v}" for k, v in r.options.items() if not isinstance(v, dict) or v)),
            "yes" if r.modified else "no",
            f"{acc.cosine:.5f}" if acc else "-", f"{acc.max_abs_error:.2e}" if acc else "-",
            _safe(_short_report(r.report)),
        )
    console = Console(stderr=True)
    if not console.is_terminal:
        console.width = 160
    console.print(table)
    for r in records:
        if isinstance(r.report.get("warning"), str):
            console.print(_safe(f"warning ({r.name}): {r.report['warning']}", style="yellow"))


def _short_report(report: dict) -> str:
    parts = []
    for key, value in report.items():
        if isinstance(value, (int, float, str, bool)) and key != "warning":  # warnings get their own line
            parts.append(f"{key}={value:.3f}" if isinstance(value, float) else f"{key}={value}")
    return " ".join(parts)[:160]


class _progress:
    """Transient progress bars on stderr (silent when not a terminal): one over the passes, and
    one over the calibration samples of the pass that is running."""

    def __init__(self, what: str):
        self.what = what

    def __enter__(self):
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        console = Console(stderr=True)
        self.progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                                 TimeElapsedColumn(), console=console, transient=True, disable=not console.is_terminal)
        self.progress.start()
        self.task = self.samples = None
        self.pass_name = ""
        return self

    def on_pass(self, index: int, total: int, name: str) -> None:
        if self.progress.disable:  # rich still writes a newline when a disabled bar stops
            return
        if self.task is None:
            self.task = self.progress.add_task(self.what, total=total)
        self.progress.update(self.task, completed=index, description=f"{self.what}: {name}" if name else self.what)
        self.pass_name = name
        if self.samples is not None:  # a new pass calibrates from sample 1 again
            self.progress.remove_task(self.samples)
            self.samples = None

    def on_sample(self, done: int, total: int) -> None:
        if self.progress.disable:
            return
        description = f"  {self.pass_name}: calibration sample" if self.pass_name else "  calibration sample"
        if self.samples is None:
            self.samples = self.progress.add_task(description, total=total)
        # Drawn at once for the last sample: short runs end before rich's own refresh.
        self.progress.update(self.samples, completed=done, total=total, description=description,
                             refresh=done == total)

    def __exit__(self, *exc):
        if not self.progress.disable:
            self.progress.stop()
        return False


# --- compile / run / bench ------------------------------------------------------------

def cmd_compile(args) -> int:
    from actsparse.api import accuracy_report, resolve_passes, source_report
    from actsparse.codegen.compile import compile_model
    from actsparse.frontend.onnx_file import _same_file, load_model
    from actsparse.ir.large import copy_model
    from actsparse.passes.base import PassContext
    from actsparse.passes.pipeline import run_pipeline

    if _same_file(Path(args.output), Path(args.model)):
        raise ActsparseError(f"{args.output}: refusing to overwrite the input model; choose another -o")
    if args.sign:  # a bad key fails now, not after minutes of compiling
        from actsparse.runtime.signing import load_private_key

        load_private_key(args.sign)
    from actsparse.frontend.causal_lm import is_causal_lm

    if is_causal_lm(args.model):
        return _compile_lm(args)
    if args.max_context is not None or args.kv_cache is not None:
        option = "--max-context" if args.max_context is not None else "--kv-cache"
        raise ActsparseError(f"{option} is for causal-LM folders; this model is an ONNX file")
    shapes = dict(_parse_shape(text) for text in args.input_shape)
    _check_writable_folder(args.report, "--report")
    _apply_recipe_calibration(args)
    model = load_model(args.model)
    records = []
    if args.passes or args.recipe:
        specs = resolve_passes(args.passes, args.recipe)
        calibration = _calibration(model, args)
        with _progress("optimizing") as progress:
            context = PassContext(calibration=calibration, seed=args.seed, on_sample=progress.on_sample)
            model, records = run_pipeline(model, specs, context, verify=not args.no_verify, on_pass=progress.on_pass)
        print_records(records)
    report = source_report(args.model) | accuracy_report(model, records)
    with _status() as step:
        result = compile_model(model, args.target, args.output, input_shapes=shapes,
                               passes=[r.to_json() for r in records], report=report,
                               bundle_runtime=args.bundle_runtime, on_step=step, copy=False,
                               reference_model=copy_model(model) if records else None)
    return _finish_compile(args, "", records, result)


def _finish_compile(args, what: str, records, result) -> int:
    """The end of `compile`, for ONNX models and causal LMs alike: kernel counts, the --report
    JSON, --sign, and the path written. `result` has path, target, kernels and seconds."""
    from actsparse.api import write_json_atomic

    kernels = Counter(layer["kernel"] for layer in result.kernels)
    print(f"compiled {what}for {args.target} in {result.seconds['total']:.1f}s; linear kernels: "
          + (", ".join(f"{k} x{v}" for k, v in kernels.items()) or "none"), file=sys.stderr)
    if args.report:
        write_json_atomic(args.report, {"passes": [r.to_json() for r in records], "target": result.target,
                                        "kernels": result.kernels, "seconds": result.seconds})
    if args.sign:
        from actsparse.runtime.signing import sign_artifact

        print(f"signed with key {sign_artifact(result.path, args.sign)}", file=sys.stderr)
    print(f"wrote {result.path}", file=sys.stderr)
    return 0


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


def _compile_lm(args) -> int:
    from actsparse.lm.compile import CALIBRATION_STEPS, compile_causal_lm

    if args.calib or args.input_shape:
        raise ActsparseError("a causal LM is calibrated on decode steps: use --calib-text, not --calib/--input-shape")
    _check_writable_folder(args.report, "--report")
    with _progress("optimizing") as progress, _status() as step:
        art = compile_causal_lm(args.model, args.target, args.passes, output=args.output, recipe=args.recipe,
                                max_context=args.max_context, calib_text=args.calib_text,
                                tokenizer=args.tokenizer, verify=not args.no_verify, seed=args.seed or 0,
                                bundle_runtime=args.bundle_runtime, on_pass=progress.on_pass, on_step=step,
                                calibration_steps=CALIBRATION_STEPS if args.samples is None else args.samples,
                                kv_cache=args.kv_cache or "float32", on_sample=progress.on_sample)
    print_records(art.records)
    return _finish_compile(args, "the decode step ", art.records, art)


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


def _artifact_inputs(model, path: str | None, seed: int) -> dict:
    from actsparse.runtime.run_command import artifact_inputs

    return artifact_inputs(model, path, seed)


def _rpc_address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ActsparseError(f"--rpc {text!r}: expected HOST:PORT, e.g. 192.168.1.20:9090")
    return host, int(port)


def _artifact_manifest(path: str) -> dict:
    """The manifest of an artifact for another machine (it cannot be loaded here), checked."""
    from actsparse.runtime.artifact import read_verified_manifest

    return read_verified_manifest(path)


class _SpecModel:
    """Just the input specs of a manifest, for generating inputs."""

    def __init__(self, manifest: dict):
        self.inputs = manifest["inputs"]


def cmd_deploy(args) -> int:
    from actsparse.deploy.reference import INPUTS_FILE, OUTPUTS_FILE, choose_reference
    from actsparse.deploy.rpc import deploy_and_run
    from actsparse.runtime.artifact import read_verified_files

    host, port = _rpc_address(args.rpc)
    manifest, packed = read_verified_files(args.artifact, (INPUTS_FILE, OUTPUTS_FILE))
    if "lm" in manifest:
        return _deploy_lm(args, manifest, host, port)
    reference = choose_reference(manifest, packed, reference=args.reference, inputs=args.inputs, seed=args.seed,
                                 atol=args.atol)
    result = deploy_and_run(args.artifact, reference.inputs, host, port, key=args.key, timeout=args.timeout,
                            reference=reference.outputs, atol=reference.atol, token=_token(args))
    print(f"deployed to {host}:{port} ({result.device.get('machine', '?')}): checksums verified, "
          f"ran in {min(result.seconds) * 1e3:.2f} ms", file=sys.stderr)
    if result.max_abs_error is not None:
        worst = max(result.max_abs_error.values()) if result.max_abs_error else 0.0
        print(one_line(f"matches {reference.described} to {worst:.2e} (atol {reference.atol:g}{reference.why_atol})"),
              file=sys.stderr)
    else:
        print(one_line(f"outputs not compared with {reference.described}"), file=sys.stderr)
    return 0


LM_DEPLOY_PROMPT = 16  # prompt tokens of the greedy check run on the board
LM_DEPLOY_NEW = 32


def _lm_prompt(manifest: dict) -> list[int]:
    """A fixed prompt: the BOS id (if any), then ids spread over the vocabulary."""
    lm = manifest["lm"]
    vocab = int(lm["vocab_size"])
    start = [int(lm["bos_token_id"])] if lm.get("bos_token_id") is not None else []
    return start + [(7919 * i + 1) % vocab for i in range(LM_DEPLOY_PROMPT - len(start))]


def _token(args) -> bytes | None:
    from actsparse.deploy.server import read_token

    return read_token(Path(args.token_file)) if getattr(args, "token_file", None) else None


def _remote_generate(args, host: str, port: int, manifest: dict, new_tokens: int) -> dict:
    from actsparse.deploy.rpc import connect

    board = connect(host, port, key=args.key, timeout=getattr(args, "timeout", 10.0), token=_token(args))
    try:
        name = board.upload_artifact(args.artifact)
        return board.generate(name, _lm_prompt(manifest), new_tokens) | {"device": board.info()}
    finally:
        board.close()


def _deploy_lm(args, manifest: dict, host: str, port: int) -> int:
    """An LM artifact: greedy tokens generated on the board, compared with a reference artifact
    for this machine (--reference HOST_LM.actsparse) when one is given."""
    result = _remote_generate(args, host, port, manifest, LM_DEPLOY_NEW)
    print(f"deployed to {host}:{port} ({result['device'].get('machine', '?')}): checksums verified; generated "
          f"{len(result['tokens'])} tokens at {result['decode_tokens_per_second']:.1f} tok/s decode, "
          f"{result['prompt_tokens_per_second']:.1f} tok/s prompt", file=sys.stderr)
    print(" ".join(map(str, result["tokens"])))
    if args.reference:
        from actsparse.runtime import load

        reference = load(args.reference)
        if not hasattr(reference, "generate"):
            raise ActsparseError(f"--reference {args.reference}: give an LM artifact compiled for this machine")
        expected = list(reference.generate(_lm_prompt(manifest), LM_DEPLOY_NEW, stop_tokens=[]))
        if expected != result["tokens"]:
            first = next(i for i, (a, b) in enumerate(zip(expected, result["tokens"])) if a != b)
            raise ActsparseError(f"the board's greedy tokens differ from {args.reference}'s from token {first}")
        print(f"greedy tokens equal {args.reference}'s", file=sys.stderr)
    return 0


def _bench_remote(args) -> int:
    import numpy as np

    from actsparse.deploy.rpc import connect

    host, port = _rpc_address(args.rpc)
    manifest = _artifact_manifest(args.artifact)
    if "lm" in manifest:
        result = _remote_generate(args, host, port, manifest, max(2, args.iters))
        print(f"{host}:{port}: decode {result['decode_tokens_per_second']:.2f} tok/s, prompt "
              f"{result['prompt_tokens_per_second']:.2f} tok/s (device side, {len(result['tokens'])} greedy tokens)")
        if args.json_out:
            from actsparse.api import write_json_atomic

            write_json_atomic(args.json_out, {k: v for k, v in result.items() if k != "tokens"})
        return 0
    feeds = _artifact_inputs(_SpecModel(manifest), None, 0)
    board = connect(host, port, key=args.key, token=_token(args))
    try:
        name = board.upload_artifact(args.artifact)
        board.run(name, feeds, repeat=3)  # warm-up: load once, first-touch the weights
        board.run(name, feeds, repeat=args.iters)
        seconds = sorted(board.last_seconds)
    finally:
        board.close()
    median = float(np.median(seconds))
    weight_bytes = manifest.get("report", {}).get("weight_bytes")
    results = {"device": f"{host}:{port}", "runs": len(seconds), "ms_median": round(median * 1e3, 4),
               "ms_best": round(seconds[0] * 1e3, 4)}
    if weight_bytes:
        results["weight_gbs"] = round(weight_bytes / median / 1e9, 3)
    from rich.console import Console
    from rich.table import Table

    table = Table("device", "runs", "ms/run (median)", "ms (best)", "weight GB/s", title="remote timings (device side)")
    table.add_row(results["device"], str(results["runs"]), f"{results['ms_median']:.3f}", f"{results['ms_best']:.3f}",
                  str(results.get("weight_gbs", "-")))
    Console().print(table)
    if args.json_out:
        from actsparse.api import write_json_atomic

        write_json_atomic(args.json_out, results)
    return 0


def cmd_bench(args) -> int:
    from actsparse.runtime import load

    if args.rpc:
        return _bench_remote(args)
    model = load(args.artifact)
    baselines = [b.strip() for b in args.against.split(",") if b.strip() and b.strip() != "none"]
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
        from actsparse.api import write_json_atomic

        write_json_atomic(args.json_out, results)
    return 0


class _status:
    """A spinner with the current step on stderr (silent when not a terminal)."""

    def __enter__(self):
        from rich.console import Console

        console = Console(stderr=True)
        # Off a terminal, rich's spinner still writes a newline when it stops: stay silent.
        self.status = console.status("compiling") if console.is_terminal else None
        if self.status is None:
            return lambda message: None
        self.status.start()
        return lambda message: self.status.update(message)

    def __exit__(self, *exc):
        if self.status is not None:
            self.status.stop()
        return False


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
    import inspect as pyinspect

    from rich.console import Console
    from rich.table import Table

    from actsparse.passes.base import available_passes, get_pass_class, option_docs, pass_summary

    console = Console()
    if args.name:
        cls = get_pass_class(args.name)
        console.print(f"[bold]{cls.name}[/] ({'exact' if cls.exact else 'approximate'})\n")
        print(pyinspect.getdoc(sys.modules[cls.__module__]) or pass_summary(cls))
        table = Table("option", "type", "default", "help")
        for doc in option_docs(cls):
            table.add_row(doc["name"], doc["type"], doc["default"], doc["help"])
        console.print(table)
        return 0
    table = Table("pass", "kind", "options", "what it does")
    for name, cls in available_passes().items():
        opts = ", ".join(f"{d['name']}={d['default']}" for d in option_docs(cls))
        table.add_row(name, "exact" if cls.exact else "approx", opts, pass_summary(cls))
    console.print(table)
    return 0


def _version() -> str:
    from actsparse import __version__

    return f"actsparse {__version__}"


if __name__ == "__main__":
    sys.exit(main())
