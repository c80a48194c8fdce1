"""What `actsparse deploy` compares with, and the tolerance it allows, decided from the manifest
alone (actsparse.deploy.reference; the runs against a server are in tests/arm/test_cli_deploy.py)."""

from __future__ import annotations

import io

import numpy as np
import onnx
import pytest

from actsparse.frontend import zoo
from actsparse.deploy.reference import INPUTS_FILE, OUTPUTS_FILE, choose_reference
from actsparse.errors import ActsparseError
from actsparse.runtime.artifact import sha256_file


def _npz(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _manifest(source=None, passes=(), kernels=(), accuracy=None, **report):
    report = dict(report, kernels=[{"name": "l", "kernel": k} for k in kernels])
    if source is not None:
        report |= {"source": str(source), "source_sha256": sha256_file(source)}
    if accuracy is not None:
        report["accuracy_vs_original"] = {"max_abs_error": accuracy}
    return {"inputs": [{"name": "x", "shape": [1, 16], "dtype": "float32"}], "passes": list(passes),
            "report": report}


def _pass(name, error):
    return {"name": name, "result": {"accuracy_vs_previous": {"max_abs_error": error}}}


PACKED = {INPUTS_FILE: _npz(x=np.ones((1, 16), np.float32)), OUTPUTS_FILE: _npz(y=np.full((1, 16), 2, np.float32))}


def choose(manifest, packed=None, **flags):
    return choose_reference(manifest, PACKED if packed is None else packed,
                            **({"reference": None, "inputs": None, "seed": None, "atol": None} | flags))


@pytest.fixture
def source(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(zoo.swiglu_stack(layers=1, d=16, f=32), path)
    return path


def test_the_packed_optimized_model_is_the_default_with_a_tight_tolerance(source):
    chosen = choose(_manifest(source, passes=[_pass("sparsify", 1.5)], accuracy=1.5))
    assert chosen.described.startswith("the optimized model the artifact was compiled from")
    assert chosen.atol == 1e-4
    np.testing.assert_array_equal(chosen.inputs["x"], np.ones((1, 16), np.float32))  # the packed inputs are sent
    np.testing.assert_array_equal(chosen.outputs["y"], np.full((1, 16), 2, np.float32))


def test_int8_kernels_get_three_times_their_quantize_pass_error(source):
    manifest = _manifest(source, passes=[_pass("sparsify", 1.5), _pass("quantize", 0.3)], kernels=["int8_dense"],
                         accuracy=1.6)
    chosen = choose(manifest)
    assert chosen.atol == pytest.approx(0.9) and "the quantize pass's measured error" in chosen.why_atol
    assert choose(manifest, atol=0.5).atol == 0.5  # --atol wins


def test_other_inputs_fall_back_to_the_unchanged_source_with_the_report_tolerance(source):
    manifest = _manifest(source, passes=[_pass("sparsify", 1.5)], accuracy=1.5)
    chosen = choose(manifest, seed=3)
    assert chosen.described.startswith(f"the source model {source}")
    assert "covers only the default inputs, not --seed 3" in chosen.described
    assert chosen.atol == pytest.approx(4.5) and chosen.outputs is not None
    onnx.save(zoo.swiglu_stack(layers=1, d=16, f=32, seed=1), source)  # changed since compile
    chosen = choose(manifest, seed=3)
    assert chosen.outputs is None and "changed since compile" in chosen.described
    source.unlink()
    assert "is not on this machine" in choose(manifest, seed=3).described


def test_an_artifact_without_a_packed_reference_says_so(source):
    chosen = choose(_manifest(source, passes=[_pass("sparsify", 1.5)], accuracy=1.5), packed={})
    assert "packs no reference of the optimized model" in chosen.described
    missing = _manifest(source, passes=[_pass("sparsify", 1.5)], reference={"missing": "onnxruntime could not run it"})
    assert "onnxruntime could not run it" in choose(missing, packed={}).described


def test_without_passes_the_source_is_the_model_compiled(source):
    chosen = choose(_manifest(source), packed={})
    assert chosen.described == f"the source model {source}" and chosen.atol == 1e-4


def test_an_explicit_reference_must_exist(source, tmp_path):
    with pytest.raises(ActsparseError, match="no such file"):
        choose(_manifest(source), reference=str(tmp_path / "missing.onnx"))
    chosen = choose(_manifest(source, passes=[_pass("sparsify", 1.5)], accuracy=1.5), reference=str(source))
    assert chosen.described == f"the model {source} (--reference)" and chosen.atol == pytest.approx(4.5)


def test_compile_packs_the_optimized_models_outputs_or_says_why_not(monkeypatch):
    import onnx_ir as ir

    from actsparse.deploy import reference
    from actsparse.deploy.reference import pack_reference

    model = ir.serde.deserialize_model(zoo.swiglu_stack(layers=1, d=16, f=32))
    specs = [{"name": "x", "shape": [1, 16], "dtype": "float32"}]
    section, files = pack_reference(model, specs)
    assert section["model"] == "optimized" and set(files) == {INPUTS_FILE, OUTPUTS_FILE}
    with np.load(io.BytesIO(files[OUTPUTS_FILE])) as outputs:
        assert outputs["y"].shape == (1, 16)

    monkeypatch.setattr(reference, "MAX_PACKED_BYTES", 100)  # the reference travels to the board
    section, files = pack_reference(model, specs)
    assert files == {} and section["missing"] == "not packed: its inputs and outputs are larger than 0 MB"
    monkeypatch.undo()

    broken = ir.serde.deserialize_model(zoo.swiglu_stack(layers=1, d=16, f=32))
    next(iter(broken.graph)).domain = "evil.example"
    section, files = pack_reference(broken, specs)
    assert files == {} and section["missing"].startswith("not packed: onnxruntime could not run it")
