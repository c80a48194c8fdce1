"""Mutated ONNX files fed to `inspect` and `optimize`: every case ends in exit 0 or 2.

The bulk of the fuzz run: structural mutations (cycles, dangling names, huge dims, missing
initializers, wrong types, duplicate names, external data escaping the folder) and byte
mutations (bit flips, truncation, garbage) of tiny models, each run in-process.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tests.reliability.harness import fuzz_settings, run_cli
from tests.reliability.mutations import byte_mutation, mutated_model_bytes, structural_mutation

MODELS = ["swiglu", "gelu_mlp", "foldable", "if"]
PASSES = ["cleanup", "cleanup{fold_constants=false}", "relufy", "measure"]

structures = st.lists(structural_mutation, min_size=0, max_size=3)
byte_mutations = st.none() | byte_mutation()


def _write_model(tiny_models, folder, name, structure, bytes_mutation):
    data = mutated_model_bytes(tiny_models[name], folder, structure, bytes_mutation)
    (folder / "model.onnx").write_bytes(data)
    return folder / "model.onnx"


@fuzz_settings(500)
@given(name=st.sampled_from(MODELS), structure=structures, mutation=st.none() | byte_mutation(),
       as_json=st.booleans())
def test_inspect_survives_mutated_models(tiny_models, cases, name, structure, mutation, as_json):
    with cases.new() as folder:
        path = _write_model(tiny_models, folder, name, structure, mutation)
        run_cli(["inspect", path] + (["--json"] if as_json else []), folder, category="inspect: mutated onnx")


@fuzz_settings(500)
@given(name=st.sampled_from(MODELS), structure=st.lists(structural_mutation, min_size=1, max_size=3),
       mutation=st.none() | st.none() | byte_mutation(), passes=st.sampled_from(PASSES), verify=st.booleans())
def test_optimize_survives_mutated_models(tiny_models, cases, name, structure, mutation, passes, verify):
    with cases.new() as folder:
        path = _write_model(tiny_models, folder, name, structure, mutation)
        argv = ["optimize", path, "-o", folder / "out.onnx", f"--passes={passes}", "--samples", "2"]
        run_cli(argv + ([] if verify else ["--no-verify"]), folder, category="optimize: mutated onnx",
                outputs=("out.onnx", "out.onnx.data"))
