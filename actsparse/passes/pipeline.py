"""Pipelines: MLIR-style text (`relufy,sparsify{method=teal,sparsity=0.5}`), YAML/JSON recipes,
and the runner that verifies the model after every pass."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx_ir as ir
import yaml

from actsparse.errors import ActsparseError, VerificationError
from actsparse.ir.ort_session import ort_session
from actsparse.passes.base import PassContext, make_pass, options_dict
from actsparse.passes.verify import OutputComparison, check_model, compare_outputs, run_onnxruntime


@dataclass
class PassSpec:
    name: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class PassRecord:
    """What one pass did: its options, its own report, and the verified accuracy cost."""

    name: str
    options: dict[str, Any]
    exact: bool
    modified: bool
    seconds: float
    report: dict[str, Any]
    vs_previous: OutputComparison | None = None
    vs_original: OutputComparison | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "options": self.options,
            "result": {
                "exact": self.exact,
                "modified": self.modified,
                "seconds": round(self.seconds, 3),
                **({"accuracy_vs_previous": self.vs_previous.to_json()} if self.vs_previous else {}),
                **({"accuracy_vs_original": self.vs_original.to_json()} if self.vs_original else {}),
                "report": self.report,
            },
        }


def parse_pipeline(text: str) -> list[PassSpec]:
    """`a,b{x=1,y=2},c` -> specs. Commas inside braces separate options, outside them passes."""
    specs: list[PassSpec] = []
    for item in _split_top_level(text.strip(), text):
        name, brace, rest = item.partition("{")
        name = name.strip()
        if not name or not name.replace("_", "").replace("-", "").isalnum():
            raise ActsparseError(f"bad pass name {name!r} in pipeline {text!r}")
        options: dict[str, Any] = {}
        if brace:
            if not rest.endswith("}"):
                raise ActsparseError(f"pass {name!r}: options must end with '}}' in pipeline {text!r}")
            for pair in filter(None, (p.strip() for p in rest[:-1].split(","))):
                key, eq, value = pair.partition("=")
                if not eq or not key.strip():
                    raise ActsparseError(f"pass {name!r}: expected key=value, got {pair!r}")
                options[key.strip()] = value.strip()
        specs.append(PassSpec(name, options))
    if not specs:
        raise ActsparseError("empty pass pipeline")
    return specs


def _split_top_level(text: str, original: str) -> list[str]:
    items, depth, current = [], 0, []
    for ch in text:
        if ch == "{":
            depth += 1
            if depth > 1:
                raise ActsparseError(f"nested braces in pipeline {original!r}")
        elif ch == "}":
            depth -= 1
            if depth < 0:
                raise ActsparseError(f"unbalanced '}}' in pipeline {original!r}")
        if ch == "," and depth == 0:
            items.append("".join(current).strip())
            current = []
        else:
            current.append(ch)
    if depth:
        raise ActsparseError(f"unbalanced '{{' in pipeline {original!r}")
    items.append("".join(current).strip())
    if any(not item for item in items):
        raise ActsparseError(f"empty pass name in pipeline {original!r}")
    return items


def load_recipe(path: str | Path) -> list[PassSpec]:
    """A YAML or JSON recipe: a list of passes, or a mapping with a `passes` list (an
    `optimize --report` file replays as a recipe). Each entry: `name`, `{name: {options}}`,
    or `{name: ..., options: {...}}`."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ActsparseError(f"{path}: no such recipe file") from None
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ActsparseError(f"{path}: not a YAML/JSON recipe ({str(exc).splitlines()[0]})") from None
    entries = data.get("passes") if isinstance(data, dict) else data
    if not isinstance(entries, list) or not entries:
        raise ActsparseError(f"{path}: a recipe needs a non-empty list of passes")
    return [_spec_from_entry(path, entry) for entry in entries]


def _spec_from_entry(path: Path, entry: Any) -> PassSpec:
    if isinstance(entry, str):
        return parse_pipeline(entry)[0]
    if isinstance(entry, dict) and "name" in entry:
        options = entry.get("options") or {}
    elif isinstance(entry, dict) and len(entry) == 1:
        (name, options), = entry.items()
        entry = {"name": name}
        options = options or {}
    else:
        raise ActsparseError(f"{path}: bad recipe entry {entry!r}")
    if not isinstance(options, dict):
        raise ActsparseError(f"{path}: options of {entry['name']!r} must be a mapping")
    return PassSpec(str(entry["name"]), dict(options))


ProgressCallback = Callable[[int, int, str], None]


def run_pipeline(
    model: ir.Model,
    specs: list[PassSpec],
    context: PassContext | None = None,
    *,
    verify: bool = True,
    verify_samples: int = 4,
    on_pass: ProgressCallback | None = None,
) -> tuple[ir.Model, list[PassRecord]]:
    """Run the passes in order; after each: onnx.checker, shape inference, and onnxruntime
    outputs against the model before it (exact passes must match to 1e-5, the others report
    cosine / max error against the previous and the original model)."""
    from actsparse.ir.graph import name_unnamed_nodes

    from actsparse.codegen.op_check import check_actsparse_ops

    context = context or PassContext()
    passes = [make_pass(spec.name, spec.options, context) for spec in specs]  # fail fast on bad options
    name_unnamed_nodes(model)  # passes and reports name layers by node name
    check_actsparse_ops(model)
    samples = (context.calibration or [])[:verify_samples] if verify else []
    original_outputs = previous_outputs = _outputs(model, samples) if samples else None
    records = []
    for index, pass_ in enumerate(passes):
        if on_pass:
            on_pass(index, len(passes), pass_.name)
        start = time.perf_counter()
        result = pass_(model)
        model = result.model
        record = PassRecord(pass_.name, options_dict(pass_.options), pass_.exact, result.modified,
                            time.perf_counter() - start, pass_.report)
        if verify:
            check_model(model, pass_.name)
        if samples:
            outputs = _outputs(model, samples, pass_.name)
            record.vs_previous = compare_outputs(previous_outputs, outputs)
            record.vs_original = compare_outputs(original_outputs, outputs)
            if pass_.exact and not record.vs_previous.within(1e-5):
                raise VerificationError(
                    f"pass {pass_.name!r} changed the model's outputs "
                    f"(max relative error {record.vs_previous.max_rel_error:.2e} > 1e-5)"
                )
            previous_outputs = outputs
        records.append(record)
    if on_pass:
        on_pass(len(passes), len(passes), "")
    return model, records


def _outputs(model: ir.Model, samples: list[dict[str, np.ndarray]], after: str | None = None):
    try:
        session = ort_session(model)  # one session for all samples: a large model's takes seconds to create
        return [run_onnxruntime(session, sample) for sample in samples]
    except ActsparseError as exc:
        if after is None:
            raise
        raise VerificationError(f"after pass {after!r}: {exc}") from None
