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


def weights_as_params(mod, params: dict, weights: list) -> tuple[Any, dict[str, list]]:
    """Put the weights that `ir.large.weightless_proto` made graph inputs back among the params.

    TVM's importer saw them as inputs after the model's own ones: `main(*inputs, *weights,
    *params)`. `num_input` drops to the model's own inputs, and the weights' arrays (in memory,
    or memory-mapped from their external-data file) go first in the params, so that `main` is
    again `main(*inputs, *params)`. The importer never held them: it would have copied each
    weight twice (onnx.numpy_helper, then a TVM tensor) and needs a protobuf under 2 GB.
    """
    arrays = {name: [p.numpy() for p in values] for name, values in params.items()}
    if not weights:
        return mod, arrays
    main = mod["main"]
    mod["main"] = main.with_attr("num_input", int(main.attrs["num_input"]) - len(weights))
    arrays["main"] = [w.const_value.numpy() for w in weights] + arrays.get("main", [])
    return mod, arrays
