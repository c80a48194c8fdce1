"""`compile` on mutated models, bad targets and bad --input-shape values.

Fewer cases than the other fuzz tests: a model that survives loading goes through TVM.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from tests.reliability.harness import fuzz_settings, run_cli
from tests.reliability.mutations import byte_mutation, mutated_model_bytes, structural_mutation

TARGETS = ["host", "x86", "rpi4", "aarch64", "cuda", "", "llvm", "nosuch", '{"kind": "llvm"}', '{"kind": 5}', "[]",
           '{"kind": "llvm", "mcpu": "no-such-cpu"}', '{"kind": "llvm", "mtriple": "riscv64-linux-gnu"}', "{", "null"]
SHAPES = ["x=1x8", "x=2x8", "x=0x8", "x=1x-8", "x=", "=1x8", "x=1x8x1", "y=1x8", "x=axb", "x=99999999999x8", "x"]


@fuzz_settings(80, share=0.05)
@given(name=st.sampled_from(["swiglu", "gelu_mlp"]), structure=st.lists(structural_mutation, max_size=2),
       mutation=st.none() | st.none() | st.none() | byte_mutation(),
       target=st.sampled_from(TARGETS) | st.text(max_size=10), shapes=st.lists(st.sampled_from(SHAPES), max_size=2),
       as_tar=st.booleans())
def test_compile_survives_bad_models_targets_and_shapes(tiny_models, cases, name, structure, mutation, target,
                                                         shapes, as_tar):
    with cases.new() as folder:
        (folder / "model.onnx").write_bytes(mutated_model_bytes(tiny_models[name], folder, structure, mutation))
        output = "out.tar" if as_tar else "out"
        argv = ["compile", folder / "model.onnx", "-o", folder / output, f"--target={target}"]
        argv += [f"--input-shape={s}" for s in shapes]
        run_cli(argv, folder, category="compile: bad input", outputs=(output,), seconds=120)
