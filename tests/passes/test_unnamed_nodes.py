"""Unnamed nodes are valid ONNX: every pass, and compile, must work on a graph whose nodes have
no names, and give every layer a unique name of its own in its report (sparsify used to crash
with "list.remove(x)" because every unnamed group was called "")."""

from __future__ import annotations

import onnx
import pytest

import actsparse
from actsparse.frontend import zoo

PIPELINES = [
    "cleanup", "relufy", "sparsify{method=teal,sparsity=0.5}", "sparsify{method=wina,sparsity=0.5}",
    "sparsify{method=cats,sparsity=0.5}", "chess{sparsity=0.5}", "measure",
    "quantize{mode=static,bits=8}", "quantize{mode=dynamic,bits=8}", "quantize{mode=weight_only,bits=4}",
    "prune{sparsity=0.5}", "predictor{steps=20}",
]


def _unnamed(model: onnx.ModelProto) -> onnx.ModelProto:
    for node in model.graph.node:
        node.name = ""
    return model


@pytest.fixture(scope="module", params=["swiglu", "gelu_mlp"])
def unnamed_model(request, tmp_path_factory):
    build = zoo.EXAMPLES[request.param]
    path = tmp_path_factory.mktemp("unnamed") / f"{request.param}.onnx"
    onnx.save(_unnamed(build(layers=2, d=32, f=64)), path)
    return path


def _layer_names(report) -> list[str]:
    names = []
    for entry in report.get("layers", []) if isinstance(report, dict) else []:
        if isinstance(entry, dict) and "name" in entry:
            names.append(entry["name"])
    return names


@pytest.mark.parametrize("passes", PIPELINES)
def test_every_pass_runs_on_unnamed_nodes(unnamed_model, passes):
    try:
        result = actsparse.optimize(str(unnamed_model), passes=passes)
    except actsparse.ActsparseError as exc:  # a clean refusal (e.g. no gated FFN) is fine; a crash is not
        assert "list.remove" not in str(exc)
        return
    names = _layer_names(result.records[-1].report)
    assert all(names), f"empty layer names in the report: {names}"
    assert len(set(names)) == len(names), f"duplicate layer names: {names}"
    assert all(node.name for node in result.model.graph)


def test_compile_names_unnamed_layers(unnamed_model, tmp_path):
    art = actsparse.compile(str(unnamed_model), passes="sparsify{method=teal,sparsity=0.5}",
                            output=tmp_path / "m.actsparse")
    names = [k["name"] for k in art.kernels]
    assert all(names) and len(set(names)) == len(names)
