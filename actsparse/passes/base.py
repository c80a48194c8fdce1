"""Pass plumbing: a typed-options base class on top of onnx_ir's passes, and the registry.

Every actsparse pass is an `onnx_ir.passes.InPlacePass` with
- a registry `name` and a docstring stating the transformation (before -> after),
- an `Options` dataclass (typed fields with defaults; `metadata={"help": ...}`),
- `exact`: whether the model's outputs must be unchanged (checked to 1e-5 after the pass),
- a `report` dict it fills while running (what changed, sparsity reached, ...).
"""

from __future__ import annotations

import dataclasses
import inspect
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Literal

import numpy as np
import onnx_ir as ir

from actsparse.errors import ActsparseError


@dataclass
class PassContext:
    """What passes may need besides the model: calibration samples and a seed. `on_sample(done,
    total)` is told as each calibration sample has run (a progress display; runs take minutes on
    real models)."""

    calibration: list[dict[str, np.ndarray]] | None = None
    seed: int = 0
    on_sample: Callable[[int, int], None] | None = None

    def require_calibration(self, pass_name: str) -> list[dict[str, np.ndarray]]:
        if not self.calibration:
            raise ActsparseError(f"pass {pass_name!r} needs calibration data (--calib file.npz or generated inputs)")
        return self.calibration


@dataclass
class NoOptions:
    pass


class ActsparsePass(ir.passes.InPlacePass):
    name: ClassVar[str] = ""
    exact: ClassVar[bool] = True
    Options: ClassVar[type] = NoOptions

    def __init__(self, options: Any = None, context: PassContext | None = None):
        super().__init__()
        self.options = options if options is not None else self.Options()
        self.context = context if context is not None else PassContext()
        self.report: dict[str, Any] = {}

    def __repr__(self) -> str:
        return f"{self.name}{{{format_options(self.options)}}}"


PASSES: dict[str, type[ActsparsePass]] = {}


def register(cls: type[ActsparsePass]) -> type[ActsparsePass]:
    if not cls.name or cls.name in PASSES:
        raise ValueError(f"pass name {cls.name!r} missing or registered twice")
    PASSES[cls.name] = cls
    return cls


def get_pass_class(name: str) -> type[ActsparsePass]:
    _load_builtin_passes()
    if name not in PASSES:
        raise ActsparseError(f"unknown pass {name!r}; available: {', '.join(sorted(PASSES))}")
    return PASSES[name]


def available_passes() -> dict[str, type[ActsparsePass]]:
    _load_builtin_passes()
    return dict(sorted(PASSES.items()))


def make_pass(name: str, options: dict[str, Any] | None = None, context: PassContext | None = None) -> ActsparsePass:
    cls = get_pass_class(name)
    return cls(parse_options(cls, options or {}), context)


def parse_options(cls: type[ActsparsePass], raw: dict[str, Any]) -> Any:
    """Build `cls.Options` from strings (pipeline text) or already-typed values (YAML/JSON)."""
    fields = {f.name: f for f in dataclasses.fields(cls.Options)}
    hints = typing.get_type_hints(cls.Options)
    values = {}
    for key, value in raw.items():
        if key not in fields:
            valid = ", ".join(fields) or "none"
            raise ActsparseError(f"pass {cls.name!r} has no option {key!r}; valid options: {valid}")
        values[key] = _coerce(cls.name, key, value, hints[key])
    options = cls.Options(**values)
    check = getattr(options, "validate", None)
    if check is not None:
        check()
    return options


def option_docs(cls: type[ActsparsePass]) -> list[dict[str, str]]:
    hints = typing.get_type_hints(cls.Options)
    docs = []
    for f in dataclasses.fields(cls.Options):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        docs.append({
            "name": f.name, "type": _type_name(hints[f.name]),
            "default": _format_value(default), "help": f.metadata.get("help", ""),
        })
    return docs


def format_options(options: Any) -> str:
    return ",".join(f"{k}={_format_value(v)}" for k, v in options_dict(options).items())


def options_dict(options: Any) -> dict[str, Any]:
    return dataclasses.asdict(options)


def pass_summary(cls: type[ActsparsePass]) -> str:
    doc = inspect.getdoc(cls) or ""
    return doc.splitlines()[0] if doc else ""


def _coerce(pass_name: str, key: str, value: Any, hint: Any) -> Any:
    where = f"pass {pass_name!r} option {key!r}"
    origin = typing.get_origin(hint)
    if origin is Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise ActsparseError(f"{where}: {value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "")):
            return None
        return _coerce(pass_name, key, value, args[0])
    if origin is dict:
        return _coerce_mapping(where, value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if str(value).lower() in ("1", "true", "yes", "on"):
            return True
        if str(value).lower() in ("0", "false", "no", "off"):
            return False
        raise ActsparseError(f"{where}: expected true/false, got {value!r}")
    if hint in (int, float):
        try:
            number = hint(value) if not isinstance(value, bool) else None
        except (TypeError, ValueError):
            number = None
        if number is None or (hint is int and float(value) != number) or not np.isfinite(number):
            raise ActsparseError(f"{where}: expected {hint.__name__}, got {value!r}")
        return number
    if hint is str:
        return str(value)
    raise TypeError(f"unsupported option type {hint} for {where}")


def _coerce_mapping(where: str, value: Any) -> dict[str, float]:
    """Per-layer overrides: a mapping, or `name:value;name:value` in pipeline text."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, str):
        items = []
        for part in filter(None, value.split(";")):
            name, sep, number = part.rpartition(":")
            if not sep or not name:
                raise ActsparseError(f"{where}: expected name:value;name:value, got {value!r}")
            items.append((name, number))
    else:
        raise ActsparseError(f"{where}: expected a mapping of layer name to number, got {value!r}")
    result = {}
    for name, number in items:
        try:
            result[str(name)] = float(number)
        except (TypeError, ValueError):
            raise ActsparseError(f"{where}: {name!r} has a non-numeric value {number!r}") from None
    return result


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return "|".join(map(str, typing.get_args(hint)))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(hint))
    if origin is dict:
        return "name:value;..."
    return getattr(hint, "__name__", str(hint))


def _format_value(value: Any) -> str:
    if isinstance(value, dict):
        return ";".join(f"{k}:{v}" for k, v in value.items())
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _load_builtin_passes() -> None:
    # Importing the package registers every built-in pass.
    import actsparse.passes  # noqa: F401


def option(default: Any, help: str) -> Any:  # noqa: A002 - mirrors argparse
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})
