"""The Python API: `actsparse.optimize` on every kind of model input, pass and calibration
argument, and its results; the helpers `to_ir_model` and `feeds_of`."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import actsparse
from actsparse.api import OptimizeResult, feeds_of, input_shapes_of, to_ir_model
from actsparse.errors import ActsparseError
from actsparse.passes import PassSpec, load_recipe
from tests.models import swiglu_stack
from tests.onnx_models import run_ort

X = {"x": np.random.default_rng(0).standard_normal((1, 64)).astype(np.float32)}


def _sparsify_count(model: ir.Model) -> int:
    return sum(node.domain == "actsparse" for node in model.graph)


def test_optimize_a_path_with_the_default_pipeline(swiglu_stack_onnx, tmp_path):
    result = actsparse.optimize(swiglu_stack_onnx)
    assert isinstance(result, OptimizeResult)
    assert [r.name for r in result.records] == ["cleanup"]
    assert result.records[0].vs_previous.within(1e-5)  # verified against generated calibration inputs
    out = result.save(tmp_path / "out.onnx")
    np.testing.assert_allclose(run_ort(out, X)[0], run_ort(swiglu_stack_onnx, X)[0], rtol=1e-6)
    onnx.checker.check_model(result.to_onnx())


def test_optimize_a_model_proto_with_a_pipeline_string():
    result = actsparse.optimize(swiglu_stack(), passes="sparsify{scope=down,sparsity=0.5}")
    (record,) = result.records
    assert record.name == "sparsify" and record.options["sparsity"] == 0.5
    assert _sparsify_count(result.model) == 2
    assert 0 < record.vs_original.cosine < 1


def test_optimize_does_not_change_the_callers_ir_model():
    model = ir.serde.deserialize_model(swiglu_stack())
    before = ir.serde.serialize_model(model).SerializeToString()
    result = actsparse.optimize(model, passes="relufy,sparsify")
    assert _sparsify_count(result.model) == 4
    assert ir.serde.serialize_model(model).SerializeToString() == before


def test_passes_as_a_list_of_strings_tuples_and_specs():
    passes = ["relufy", ("sparsify", {"scope": "down", "sparsity": 0.3}), PassSpec("cleanup")]
    result = actsparse.optimize(swiglu_stack(), passes=passes)
    assert [r.name for r in result.records] == ["relufy", "sparsify", "cleanup"]
    assert result.records[1].options["scope"] == "down" and result.records[1].options["sparsity"] == 0.3


def test_recipe_and_its_conflict_with_passes(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("- sparsify: {method: wina, scope: down}\n")
    result = actsparse.optimize(swiglu_stack(), recipe=recipe)
    assert result.records[0].options["method"] == "wina"
    with pytest.raises(ActsparseError, match="either passes or a recipe"):
        actsparse.optimize(swiglu_stack(), passes="cleanup", recipe=recipe)


def test_report_is_json_and_replays_as_a_recipe(tmp_path):
    result = actsparse.optimize(swiglu_stack(), passes="sparsify{allocate=greedy,scope=ffn,overrides=layers.0.mlp.down_proj:0.1}")
    report = result.report()
    assert report["actsparse_version"] == actsparse.__version__
    path = tmp_path / "report.json"
    path.write_text(json.dumps(report))
    (spec,) = load_recipe(path)
    replay = actsparse.optimize(swiglu_stack(), recipe=path)
    assert spec.name == "sparsify" and spec.options["overrides"] == {"layers.0.mlp.down_proj": 0.1}
    assert replay.to_onnx().SerializeToString() == result.to_onnx().SerializeToString()


@pytest.mark.parametrize("kind", ["dict", "list", "path"])
def test_calibration_arguments(tmp_path, kind):
    rng = np.random.default_rng(1)
    stacked = rng.standard_normal((5, 1, 64)).astype(np.float32)
    if kind == "dict":
        calib = {"x": stacked}
    elif kind == "list":
        calib = [{"x": sample} for sample in stacked]
    else:
        calib = tmp_path / "calib.npz"
        np.savez(calib, x=stacked)
    result = actsparse.optimize(swiglu_stack(), passes="sparsify{scope=down}", calib=calib)
    layer = result.records[0].report["layers"][0]
    hidden = []  # the threshold is the median of |hidden| over exactly these 5 samples
    for sample in stacked:
        h = sample @ _w("layers.0.mlp.gate_proj")
        hidden.append(h / (1 + np.exp(-h)) * (sample @ _w("layers.0.mlp.up_proj")))
    assert layer["threshold"] == pytest.approx(float(np.quantile(np.abs(np.concatenate(hidden)), 0.5)), rel=1e-4)


def _w(name: str) -> np.ndarray:
    return {t.name: onnx.numpy_helper.to_array(t) for t in swiglu_stack().graph.initializer}[f"{name}.weight"]


def test_on_pass_progress_and_no_verify():
    calls = []
    result = actsparse.optimize(swiglu_stack(), passes="relufy,cleanup", verify=False,
                                on_pass=lambda i, n, name: calls.append((i, n, name)))
    assert calls == [(0, 2, "relufy"), (1, 2, "cleanup"), (2, 2, "")]
    assert all(r.vs_previous is None for r in result.records)  # nothing was compared


def test_save_refuses_to_overwrite_the_source(swiglu_stack_onnx, tmp_path):
    result = actsparse.optimize(swiglu_stack_onnx)
    with pytest.raises(ActsparseError, match="refusing to overwrite the input"):
        result.save(swiglu_stack_onnx, source=swiglu_stack_onnx)


def test_to_ir_model_errors():
    with pytest.raises(ActsparseError, match="cannot read a model from int"):
        to_ir_model(3)
    torch = pytest.importorskip("torch")
    with pytest.raises(ActsparseError, match="needs example_inputs"):
        to_ir_model(torch.nn.Linear(2, 2))


def test_feeds_of_tuples_dicts_and_tensors():
    model = ir.serde.deserialize_model(swiglu_stack())
    x = X["x"]
    assert feeds_of(model, x)["x"] is not None
    np.testing.assert_array_equal(feeds_of(model, (x,))["x"], x)
    torch = pytest.importorskip("torch")
    converted = feeds_of(model, {"x": torch.from_numpy(x)})["x"]
    assert isinstance(converted, np.ndarray)
    np.testing.assert_array_equal(converted, x)
    assert input_shapes_of(model, {"x": x}) == {"x": (1, 64)} and input_shapes_of(model, None) == {}
    with pytest.raises(ActsparseError, match=r"2 example inputs for a model with inputs \['x'\]"):
        feeds_of(model, (x, x))
    with pytest.raises(ActsparseError, match="example input 'y' is not a model input"):
        feeds_of(model, {"y": x})


def test_lazy_public_names():
    assert callable(actsparse.optimize) and actsparse.ActsparseError is ActsparseError
    with pytest.raises(AttributeError, match="no attribute 'nosuch'"):
        actsparse.nosuch  # noqa: B018


def test_an_optimized_model_carries_its_accuracy_report(tmp_path):
    """optimize writes its passes' error into the ONNX metadata; a later optimize adds its own (the
    max abs errors add up, a bound) and compile without passes puts it in the manifest."""
    import json

    from actsparse.api import ACCURACY_METADATA_KEY

    first = actsparse.optimize(swiglu_stack(), passes="relufy")
    first.save(tmp_path / "relu.onnx")
    recorded = json.loads(onnx.load(tmp_path / "relu.onnx").metadata_props[0].value)
    assert recorded["max_abs_error"] == pytest.approx(first.records[-1].vs_original.max_abs_error, rel=1e-6)
    second = actsparse.optimize(str(tmp_path / "relu.onnx"), passes="quantize{bits=8}")
    chained = json.loads(second.model.metadata_props[ACCURACY_METADATA_KEY])
    assert chained["max_abs_error_is_bound"] and len(chained["runs"]) == 2
    assert chained["max_abs_error"] == pytest.approx(recorded["max_abs_error"]
                                                     + second.records[-1].vs_original.max_abs_error, rel=1e-6)
    second.save(tmp_path / "relu.int8.onnx")
    art = actsparse.compile(str(tmp_path / "relu.int8.onnx"), output=tmp_path / "a.actsparse")
    assert art.load().manifest["report"]["accuracy_vs_original"] == chained
