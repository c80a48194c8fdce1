"""compile refuses ops it would misread (unknown domains, malformed actsparse ops) with one line."""

from __future__ import annotations

import subprocess
import sys

import onnx
import pytest
from onnx import TensorProto, helper

import actsparse
from actsparse.frontend import zoo


def _model(node, extra_inits=(), opsets=(("", 17),)):
    import numpy as np
    from onnx import numpy_helper

    w = numpy_helper.from_array(np.ones((8, 8), np.float32), "w")
    t = numpy_helper.from_array(np.array(0.1, np.float32), "t")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])], [w, t, *extra_inits])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets])
    model.ir_version = 8
    return model


CASES = {
    "foreign domain": (helper.make_node("MatMul", ["x", "w"], ["y"], domain="evil.example", name="mm"),
                       r"does not support ops of domain 'evil.example'"),
    "Sparsify with 3 inputs": (helper.make_node("Sparsify", ["x", "t", "t"], ["y"], domain="actsparse", name="s"),
                               r"takes 2 inputs and 1 outputs, has 3"),
    "Sparsify with an attribute": (helper.make_node("Sparsify", ["x", "t"], ["y"], domain="actsparse", name="s",
                                                    bogus=1), r"takes no attributes, has bogus"),
    "unknown actsparse op": (helper.make_node("Explode", ["x"], ["y"], domain="actsparse", name="e"),
                             r"unknown actsparse op"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_compile_refuses_what_it_would_misread(case, tmp_path):
    node, message = CASES[case]
    path = tmp_path / "m.onnx"
    onnx.save(_model(node, opsets=(("", 17), (node.domain, 1))), path)
    with pytest.raises(actsparse.ActsparseError, match=message):
        actsparse.compile(str(path), output=tmp_path / "m.actsparse")
    done = subprocess.run([sys.executable, "-m", "actsparse.cli", "compile", str(path), "-o", str(tmp_path / "o")],
                          capture_output=True, text=True)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert not (tmp_path / "o").exists()


def test_well_formed_actsparse_ops_still_compile(tmp_path):
    path = tmp_path / "ffn.onnx"
    onnx.save(zoo.swiglu_stack(layers=1, d=32, f=64), path)
    art = actsparse.compile(str(path), passes="sparsify{method=wina,sparsity=0.5}", output=tmp_path / "m.actsparse")
    assert art.kernels


def test_a_tvm_failure_is_one_meaningful_line(tmp_path):
    """A MatMul whose weight has the transposed shape: TVM fails deep inside; the user gets one line
    that says what (not TVM's caret lines or its C++ warnings first)."""
    import numpy as np
    from onnx import numpy_helper

    w = numpy_helper.from_array(np.ones((16, 8), np.float32), "w")
    node = helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "t.onnx")
    done = subprocess.run([sys.executable, "-m", "actsparse.cli", "compile", str(tmp_path / "t.onnx"), "-o",
                           str(tmp_path / "o")], capture_output=True, text=True)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("actsparse: error: TVM failed to compile the model: ")
    assert "mismatch" in lines[0] and "^^^" not in lines[0]


@pytest.mark.parametrize("case", [c for c in CASES if c != "foreign domain"])
def test_optimize_names_a_malformed_actsparse_op(case, tmp_path):
    """optimize refused these through onnxruntime ("actsparse:Sparsify(-1) is not a registered
    function/op"); it now says what is wrong with the node, before any pass runs."""
    node, message = CASES[case]
    with pytest.raises(actsparse.ActsparseError, match=message):
        actsparse.optimize(_model(node, opsets=(("", 17), (node.domain, 1))))
