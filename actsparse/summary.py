"""What people see of a model and of a run: the model summary `actsparse inspect` prints
(`model_summary`), the passes' table `optimize` and `compile` print (`print_records`), the
pass list (`print_passes`), and the progress shown on a terminal while they work.

Names from a model file are shown escaped and never read as rich markup: a hostile name must
not drive the terminal or break a table.
"""

from __future__ import annotations

import sys
from collections import Counter
from typing import Any

from actsparse.errors import one_line


def model_summary(model) -> dict[str, Any]:
    """An onnx_ir Model's opset, node and parameter counts, inputs and outputs, ops, the FFN and
    attention blocks found (by the names per-layer `overrides=` accept) and its activations."""
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


def print_model_summary(title: str, summary: dict[str, Any]) -> None:
    """`model_summary` as tables on stdout, under `title` (the model's path)."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    header = safe_text(title, style="bold")
    header.append(f"  opset {summary['opset']}  {summary['parameters']:,} parameters "
                  f"({summary['parameter_bytes'] / 1e6:.1f} MB)  {summary['nodes']} nodes")
    console.print(header)
    io = Table("kind", "name", "dtype", "shape", title="inputs / outputs")
    for kind in ("inputs", "outputs"):
        for item in summary[kind]:
            io.add_row(kind[:-1], safe_text(item["name"]), item["dtype"], safe_text(item["shape"]))
    console.print(io)
    ops = Table("op", "count", title="ops")
    for op, count in summary["ops"].items():
        ops.add_row(safe_text(op), str(count))
    console.print(ops)
    blocks = Table("block", "kind", "activation", "linears (in x out)", title="blocks found")
    for block in summary["ffn_blocks"] + summary["attention_blocks"]:
        blocks.add_row(safe_text(block["name"]), block["kind"], block.get("activation", ""),
                       safe_text(", ".join(block["linears"])))
    console.print(blocks)
    console.print(f"linear layers: {summary['linears']}  activations: {summary['activations'] or 'none'}")


def print_records(records) -> None:
    """The pass records (`OptimizeResult.records`) as a table on stderr, then each pass's warning."""
    from rich.console import Console
    from rich.table import Table

    table = Table("pass", "options", "changed", "cosine", "max abs err", "details", title="passes (accuracy vs the input model)")
    for r in records:
        acc = r.vs_original
        table.add_row(
            r.name, safe_text(",".join(f"{k}={v}" for k, v in r.options.items() if not isinstance(v, dict) or v)),
            "yes" if r.modified else "no",
            f"{acc.cosine:.5f}" if acc else "-", f"{acc.max_abs_error:.2e}" if acc else "-",
            safe_text(_short_report(r.report)),
        )
    console = Console(stderr=True)
    if not console.is_terminal:
        console.width = 160
    console.print(table)
    for r in records:
        if isinstance(r.report.get("warning"), str):
            console.print(safe_text(f"warning ({r.name}): {r.report['warning']}", style="yellow"))


def _short_report(report: dict) -> str:
    parts = []
    for key, value in report.items():
        if isinstance(value, (int, float, str, bool)) and key != "warning":  # warnings get their own line
            parts.append(f"{key}={value:.3f}" if isinstance(value, float) else f"{key}={value}")
    return " ".join(parts)[:160]


def safe_text(value, style: str = ""):
    """Text from a model file for the terminal: control characters escaped (a name with ESC or a
    newline must not drive the terminal or break the table) and never read as rich markup."""
    from rich.text import Text

    return Text(one_line(str(value)), style=style)


def print_passes(name: str | None = None) -> None:
    """The passes with their options as a table on stdout; with `name`, that pass in full (its
    module's docstring and every option)."""
    import inspect as pyinspect

    from rich.console import Console
    from rich.table import Table

    from actsparse.passes.base import available_passes, get_pass_class, option_docs, pass_summary

    console = Console()
    if name:
        cls = get_pass_class(name)
        console.print(f"[bold]{cls.name}[/] ({'exact' if cls.exact else 'approximate'})\n")
        print(pyinspect.getdoc(sys.modules[cls.__module__]) or pass_summary(cls))
        table = Table("option", "type", "default", "help")
        for doc in option_docs(cls):
            table.add_row(doc["name"], doc["type"], doc["default"], doc["help"])
        console.print(table)
        return
    table = Table("pass", "kind", "options", "what it does")
    for pass_name, cls in available_passes().items():
        opts = ", ".join(f"{d['name']}={d['default']}" for d in option_docs(cls))
        table.add_row(pass_name, "exact" if cls.exact else "approx", opts, pass_summary(cls))
    console.print(table)


# --- progress on a terminal (silent when stderr is not one) ---

class PassProgress:
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


class Spinner:
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


class CompileProgress:
    """`compile` on stderr: the progress bars while the passes run, their table once they are
    done, then a spinner with the compile step (all of it but the table only on a terminal)."""

    def __enter__(self):
        self.progress = PassProgress("optimizing").__enter__()
        self.on_pass, self.on_sample = self.progress.on_pass, self.progress.on_sample
        self.status = self.step = None
        return self

    def on_optimized(self, records) -> None:
        self._stop_progress()
        print_records(records)

    def on_step(self, message: str) -> None:
        if self.step is None:
            self._stop_progress()
            self.status = Spinner()
            self.step = self.status.__enter__()
        self.step(message)

    def _stop_progress(self) -> None:
        if self.progress is not None:
            self.progress.__exit__(None, None, None)
            self.progress = None

    def __exit__(self, *exc):
        self._stop_progress()
        if self.status is not None:
            self.status.__exit__(*exc)
        return False
