"""Per-layer `overrides=`: a value for some layers instead of the pass's own, for every pass that
acts per layer (sparsify, chess, prune, quantize).

A key names a layer by the names `actsparse inspect` prints: a block (`layers.0.mlp`,
`layers.0.self_attn`: every layer of the pass that reads one of the block's linears), a linear
(`layers.0.mlp.down_proj`), or the layer itself as the pass's report names it (sparsify's groups,
e.g. `layers.0.mlp.gate_proj+layers.0.mlp.up_proj`). A key that names none of the pass's layers
is an error that lists the names it would take.

    overrides: dict[str, float] = overrides_option("sparsity")
    values = apply_overrides(self.name, self.options.overrides, {layer: default, ...},
                             {layer: {linear names}, ...}, model)
"""

from __future__ import annotations

from typing import Any

import onnx_ir as ir

from actsparse.errors import ActsparseError
from actsparse.passes.base import option


def overrides_option(what: str) -> Any:
    """The `overrides` option field of a pass whose per-layer value is `what`."""
    return option({}, f"per-layer {what}, by the block or linear names `actsparse inspect` prints "
                      f"(name:value;name:value)")


def block_linears(model: ir.Model) -> dict[str, set[str]]:
    """The FFN and attention blocks `actsparse inspect` prints, by name: the names of their linears."""
    from actsparse.ir.blocks import find_blocks

    blocks = find_blocks(model)
    names = {b.name: {l.name for l in b.linears} for b in blocks.ffn}
    names |= {b.name: {l.name for l in (b.q, b.k, b.v, b.o) if l} for b in blocks.attention}
    return names


def apply_overrides(pass_name: str, overrides: dict[str, float], values: dict[str, Any],
                    layer_linears: dict[str, set[str]], model: ir.Model, *, noun: str = "layer") -> dict[str, Any]:
    """`values` (the pass's value per layer) with the overrides applied, in their order.

    Args:
        pass_name: the pass, for the error message.
        overrides: the option: {block, linear or layer name: value}.
        values: the value of each layer before the overrides.
        layer_linears: the names of the linears each layer covers.
        model: the model the blocks are found in (only when there are overrides).
        noun: what a layer of this pass is, for the error message ("sparsified layer", "FFN block").

    Returns:
        A new dict: `values` with each overridden layer's value replaced.

    Raises:
        ActsparseError: a key names none of the layers.
    """
    values = dict(values)
    if not overrides:
        return values
    blocks = block_linears(model)
    for key, value in overrides.items():
        matches = [layer for layer, linears in layer_linears.items()
                   if key == layer or key in linears or key in blocks and blocks[key] & linears]
        if not matches:
            listing = f"blocks: {', '.join(blocks) or 'none'}"
            if list(layer_linears) != list(blocks):
                listing += f"; layers: {', '.join(layer_linears)}"
            raise ActsparseError(f"pass {pass_name!r}: override {key!r} names no {noun}; {listing}")
        for layer in matches:
            values[layer] = value
    return values
