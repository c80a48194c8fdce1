"""Per-layer `overrides=` through one helper (actsparse.passes.overrides): the names `actsparse
inspect` prints (blocks), linear names, and the errors, for prune and quantize (sparsify and chess
are covered in their own tests)."""

from __future__ import annotations

import onnx_ir as ir
import pytest

import actsparse
from actsparse.errors import ActsparseError
from actsparse.frontend.zoo import swiglu_stack
from actsparse.passes.overrides import apply_overrides, block_linears
from actsparse.summary import model_summary


def _model() -> ir.Model:
    return ir.serde.deserialize_model(swiglu_stack(layers=2, d=32, f=64))


def _last_report(passes: str) -> dict:
    return actsparse.optimize(swiglu_stack(layers=2, d=32, f=64), passes=passes).records[-1].report


def test_block_names_are_the_ones_inspect_prints():
    model = _model()
    printed = [b["name"] for b in model_summary(model)["ffn_blocks"] + model_summary(model)["attention_blocks"]]
    assert list(block_linears(model)) == printed == ["layers.0.mlp", "layers.1.mlp"]


def test_a_key_sets_the_layer_its_linear_or_every_layer_of_its_block():
    model = _model()
    layers = {"a": {"layers.0.mlp.gate_proj", "layers.0.mlp.up_proj"}, "b": {"layers.0.mlp.down_proj"},
              "c": {"layers.1.mlp.down_proj"}}
    values = apply_overrides("p", {"layers.0.mlp": 0.2, "c": 0.3}, dict.fromkeys(layers, 0.5), layers, model)
    assert values == {"a": 0.2, "b": 0.2, "c": 0.3}
    values = apply_overrides("p", {"layers.0.mlp.up_proj": 0.1}, dict.fromkeys(layers, 0.5), layers, model)
    assert values == {"a": 0.1, "b": 0.5, "c": 0.5}
    with pytest.raises(ActsparseError, match=r"pass 'p': override 'nope' names no layer; blocks: layers\.0\.mlp, "
                                             r"layers\.1\.mlp; layers: a, b, c"):
        apply_overrides("p", {"nope": 0.1}, dict.fromkeys(layers, 0.5), layers, model)


def test_prune_overrides_by_block_and_linear_name():
    report = _last_report("prune{sparsity=0.5,overrides=layers.0.mlp:0.9;layers.1.mlp.down_proj:0.1}")
    reached = {layer["name"]: layer["sparsity"] for layer in report["layers"]}
    assert all(reached[f"layers.0.mlp.{n}"] == pytest.approx(0.9, abs=1e-3) for n in ("gate_proj", "up_proj", "down_proj"))
    assert reached["layers.1.mlp.down_proj"] == pytest.approx(0.1, abs=1e-3)
    assert reached["layers.1.mlp.gate_proj"] == reached["layers.1.mlp.up_proj"] == pytest.approx(0.5, abs=1e-3)


@pytest.mark.parametrize("passes, message", [
    ("prune{overrides=nope:0.5}", "override 'nope' names no prunable linear"),
    ("prune{overrides=layers.0.mlp:1.5}", r"sparsity for 'layers\.0\.mlp' must be in \[0, 1\]"),
    ("prune{scope=global,overrides=layers.0.mlp:0.5}", "need method=magnitude, scope=layer"),
    ("prune{method=nm,overrides=layers.0.mlp:0.5}", "need method=magnitude, scope=layer"),
    ("quantize{overrides=nope:0}", "override 'nope' names no quantizable linear"),
    ("quantize{bits=8,overrides=layers.0.mlp:4}", r"bits for 'layers\.0\.mlp' must be 0 \(keep it float\) or 8"),
    ("quantize{bits=4,overrides=layers.0.mlp:0;layers.1.mlp:0}", "keep every linear layer float"),
])
def test_override_errors(passes, message):
    with pytest.raises(ActsparseError, match=message):
        actsparse.optimize(swiglu_stack(layers=2, d=32, f=64), passes=passes)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantize_override_zero_keeps_a_block_float(bits):
    report = _last_report(f"quantize{{bits={bits},speed_check=false,overrides=layers.1.mlp:0}}")
    kept = {entry["name"] for entry in report["stayed_float"] if entry["reason"] == "overrides: kept float"}
    assert kept == {"layers.1.mlp.gate_proj", "layers.1.mlp.up_proj", "layers.1.mlp.down_proj"}
    assert {layer["name"] for layer in report["layers"]} == {"layers.0.mlp.gate_proj", "layers.0.mlp.up_proj",
                                                               "layers.0.mlp.down_proj"}


def test_quantize_override_equal_to_bits_changes_nothing():
    plain = _last_report("quantize{bits=4,speed_check=false}")
    same = _last_report("quantize{bits=4,speed_check=false,overrides=layers.0.mlp:4}")
    assert same["layers"] == plain["layers"] and same["stayed_float"] == plain["stayed_float"]
