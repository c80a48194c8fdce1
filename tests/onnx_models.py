"""Small ONNX models built by hand with onnx.helper, for pass and CLI tests."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


def _model(nodes, inputs, outputs, initializers=(), opset=17, **kwargs):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], **kwargs)
    model.ir_version = min(model.ir_version, 8) if opset <= 17 else model.ir_version
    onnx.checker.check_model(model)
    return model


def mlp_with_foldable_constants(opset: int = 17, dynamic_batch: bool = True) -> onnx.ModelProto:
    """x[N,8] -> MatMul -> Add(bias computed from constants) -> Identity -> Gelu-free Relu -> MatMul."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((8, 16)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((16, 4)).astype(np.float32), "w2")
    half = numpy_helper.from_array(np.full((16,), 0.5, np.float32), "half")
    batch = "N" if dynamic_batch else 2
    nodes = [
        helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(np.ones(16, np.float32))),
        helper.make_node("Mul", ["c", "half"], ["bias"]),  # foldable
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Add", ["h", "bias"], ["hb"]),
        helper.make_node("Identity", ["hb"], ["hi"]),
        helper.make_node("Relu", ["hi"], ["r"]),
        helper.make_node("Neg", ["r"], ["unused"]),  # dead
        helper.make_node("MatMul", ["r", "w2"], ["y"]),
    ]
    return _model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 8])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 4])], [w1, w2, half], opset=opset)


def if_model(opset: int = 17) -> onnx.ModelProto:
    """y = cond ? x * 2 : x - 1, with an Identity inside a branch."""
    two = numpy_helper.from_array(np.array(2.0, np.float32), "two")
    one = numpy_helper.from_array(np.array(1.0, np.float32), "one")
    out = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, [3])  # noqa: E731
    then_g = helper.make_graph([helper.make_node("Mul", ["x", "two"], ["t0"]), helper.make_node("Identity", ["t0"], ["t"])],
                               "then", [], [out("t")])
    else_g = helper.make_graph([helper.make_node("Sub", ["x", "one"], ["e"])], "else", [], [out("e")])
    nodes = [helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g)]
    return _model(nodes, [helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
                          helper.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
                  [out("y")], [two, one], opset=opset)


def loop_model(opset: int = 17) -> onnx.ModelProto:
    """Sum x into an accumulator `trip` times: y = acc0 + trip * x."""
    body = helper.make_graph(
        [helper.make_node("Identity", ["cond_in"], ["cond_out"]), helper.make_node("Add", ["acc_in", "x"], ["acc_out"])],
        "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []),
         helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
         helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [4])],
    )
    nodes = [
        helper.make_node("Constant", [], ["keep_going"], value=numpy_helper.from_array(np.array(True))),
        helper.make_node("Loop", ["trip", "keep_going", "acc0"], ["y"], body=body),
    ]
    return _model(nodes, [helper.make_tensor_value_info("trip", TensorProto.INT64, []),
                          helper.make_tensor_value_info("acc0", TensorProto.FLOAT, [4]),
                          helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], opset=opset)


def random_feeds(model: onnx.ModelProto, seed: int = 0, dynamic: int = 3) -> dict[str, np.ndarray]:
    """Inputs for a model: dynamic dims set to `dynamic`, bools True, ints small positive."""
    rng = np.random.default_rng(seed)
    initializers = {i.name for i in model.graph.initializer}
    feeds = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        tensor = value.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else dynamic for d in tensor.shape.dim]
        dtype = helper.tensor_dtype_to_np_dtype(tensor.elem_type)
        if dtype == np.bool_:
            feeds[value.name] = np.ones(shape, dtype=bool)
        elif np.issubdtype(dtype, np.integer):
            feeds[value.name] = np.full(shape, 3, dtype=dtype)
        else:
            feeds[value.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def run_ort(model_or_path, feeds) -> list[np.ndarray]:
    import onnxruntime as ort

    source = model_or_path.SerializeToString() if isinstance(model_or_path, onnx.ModelProto) else str(model_or_path)
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"]).run(None, feeds)
