"""Every model the CPU lowering handles also compiles for `cuda` (no GPU needed, nvcc is): the
lowering picks only kernels with a CUDA twin (the dense FFN as three dense GEMVs, quantized
linears with TVM's own lowering) and refuses what has none with one line."""

from __future__ import annotations

import shutil

import onnx
import pytest

pytest.importorskip("tvm")

import actsparse  # noqa: E402
from actsparse.frontend import zoo  # noqa: E402
from actsparse.errors import ActsparseError  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (CUDA toolkit) not on PATH")

CASES = {
    "swiglu dense": ("swiglu", None, {"dense"}),
    "swiglu TEAL ffn": ("swiglu", "sparsify{method=teal,sparsity=0.5,scope=ffn}", {"ffn_input_sparse"}),
    "swiglu relufy": ("swiglu", "relufy", {"ffn_gate_sparse"}),
    "swiglu WINA": ("swiglu", "sparsify{method=wina,sparsity=0.5}", {"scaled"}),
    # No CUDA R-Sparse kernel yet: expanded into SparsifyWeighted + MatMuls (kept rows sparse, factors dense).
    "swiglu R-Sparse": ("swiglu", "rsparse{sparsity=0.5,sparse_ratio=0.5,scope=ffn}", {"scaled", "dense"}),
    "gelu_mlp dense": ("gelu_mlp", None, {"dense"}),
    "swiglu int8 dynamic": ("swiglu", "quantize{mode=dynamic,bits=8}", {"tvm"}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_example_models_compile_for_cuda(case, tmp_path):
    name, passes, kernels = CASES[case]
    onnx.save(zoo.EXAMPLES[name](layers=2, d=128, f=256), tmp_path / "m.onnx")
    art = actsparse.compile(str(tmp_path / "m.onnx"), target="cuda:sm_90", passes=passes,
                            output=tmp_path / "m.actsparse")
    assert {k["kernel"] for k in art.kernels} == kernels
    assert art.target["arch"] == "sm_90"


@pytest.mark.parametrize("passes", ["quantize{mode=weight_only,bits=4}", "quantize{mode=weight_only,bits=4,format=qdq}"])
def test_int4_for_cuda_is_a_clear_refusal(passes, tmp_path):
    onnx.save(zoo.swiglu_stack(layers=1, d=128, f=256), tmp_path / "m.onnx")
    with pytest.raises(ActsparseError, match="no CUDA kernel yet"):
        actsparse.compile(str(tmp_path / "m.onnx"), target="cuda:sm_90", passes=passes, output=tmp_path / "m.actsparse")
