"""Glue for TVM's ONNX importer: our ops' converters."""

from __future__ import annotations

from typing import Any, Callable


def as_converter(convert: Callable[..., Any]) -> type:
    """A class `tvm.relax.frontend.onnx.from_onnx` accepts in its convert map, calling
    `convert(bb, inputs, attrs, params)` for every opset."""
    return type("Converter", (), {"get_converter": classmethod(lambda cls, opset: convert)})


def attr_text(value: Any) -> str:
    """A string attribute as the importer hands it over (bytes or str)."""
    return value.decode() if isinstance(value, bytes) else str(value)
