"""Built-in example models, built with onnx.helper (no downloads, no torch).

- `swiglu_stack`: Llama-style SwiGLU FFN blocks with residuals (the decode-time hot path).
- `gelu_mlp_stack`: BERT-style GELU MLP blocks (Gemm with transB=1 + Erf GELU).

    actsparse example swiglu -o ffn.onnx --layers 4 --d 1024 --f 2816
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

def _finish(nodes, inputs, outputs, initializers: list, opset: int = 17) -> onnx.ModelProto:
    """The model, taking the `initializers` out of the list one at a time (protobuf copies each
    one in): a model of many GB (`actsparse example ... --layers 32`) is never held twice."""
    graph = helper.make_graph(nodes, "ffn_stack", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8  # readable by every onnxruntime in use
    size = 0
    initializers.reverse()
    while initializers:
        tensor = initializers.pop()
        size += len(tensor.raw_data)
        model.graph.initializer.append(tensor)
        del tensor
    if size < 1 << 30:  # the checker serializes the model, and protobuf caps at 2 GB
        onnx.checker.check_model(model)
    return model


def swiglu_stack(layers: int = 2, d: int = 64, f: int = 176, tokens: int = 1, seed: int = 0) -> onnx.ModelProto:
    """Llama-style SwiGLU FFN stack: h += down(silu(gate(h)) * up(h)) per layer, x: [tokens, d].

    Linears are MatMul nodes named after modules (`layers.0.mlp.gate_proj`), weights [in, out].
    """
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    h = "x"
    for i in range(layers):
        p = f"layers.{i}.mlp"
        for name, shape in (("gate_proj", (d, f)), ("up_proj", (d, f)), ("down_proj", (f, d))):
            w = (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)
            inits.append(numpy_helper.from_array(w, f"{p}.{name}.weight"))
        nodes += [
            helper.make_node("MatMul", [h, f"{p}.gate_proj.weight"], [f"{p}.gate"], name=f"{p}.gate_proj"),
            helper.make_node("Sigmoid", [f"{p}.gate"], [f"{p}.sig"], name=f"{p}.act_fn/Sigmoid"),
            helper.make_node("Mul", [f"{p}.gate", f"{p}.sig"], [f"{p}.act"], name=f"{p}.act_fn/Mul"),
            helper.make_node("MatMul", [h, f"{p}.up_proj.weight"], [f"{p}.up"], name=f"{p}.up_proj"),
            helper.make_node("Mul", [f"{p}.act", f"{p}.up"], [f"{p}.hidden"], name=f"{p}/Mul"),
            helper.make_node("MatMul", [f"{p}.hidden", f"{p}.down_proj.weight"], [f"{p}.down"], name=f"{p}.down_proj"),
            helper.make_node("Add", [h, f"{p}.down"], [f"layers.{i}.out"], name=f"layers.{i}/residual"),
        ]
        h = f"layers.{i}.out"
    nodes.append(helper.make_node("Identity", [h], ["y"], name="output"))
    return _finish(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [tokens, d])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [tokens, d])], inits)


def gelu_mlp_stack(layers: int = 2, d: int = 64, f: int = 128, tokens: int = 1, seed: int = 0) -> onnx.ModelProto:
    """BERT-style GELU MLP stack: h += fc2(gelu(fc1(h))) per layer, x: [tokens, d].

    fc1 is a Gemm with transB=1 (weight [out, in]) and bias; GELU is the exporters' Erf
    decomposition `x * (0.5 * (1 + Erf(x / sqrt 2)))`; fc2 is MatMul (weight [in, out]) + Add.
    """
    rng = np.random.default_rng(seed)
    nodes, inits = [], []
    inits += [numpy_helper.from_array(np.array(v, np.float32), n)
              for n, v in (("sqrt2", np.sqrt(2.0)), ("one", 1.0), ("half", 0.5))]
    h = "x"
    for i in range(layers):
        p = f"layers.{i}.mlp"
        inits += [
            numpy_helper.from_array((rng.standard_normal((f, d)) / np.sqrt(d)).astype(np.float32), f"{p}.fc1.weight"),
            numpy_helper.from_array((0.1 * rng.standard_normal(f)).astype(np.float32), f"{p}.fc1.bias"),
            numpy_helper.from_array((rng.standard_normal((f, d)) / np.sqrt(f)).astype(np.float32), f"{p}.fc2.weight"),
            numpy_helper.from_array((0.1 * rng.standard_normal(d)).astype(np.float32), f"{p}.fc2.bias"),
        ]
        u, a = f"{p}.fc1.out", f"{p}.act.out"
        nodes += [
            helper.make_node("Gemm", [h, f"{p}.fc1.weight", f"{p}.fc1.bias"], [u], name=f"{p}.fc1", transB=1),
            helper.make_node("Div", [u, "sqrt2"], [f"{p}.act.div"], name=f"{p}.act/Div"),
            helper.make_node("Erf", [f"{p}.act.div"], [f"{p}.act.erf"], name=f"{p}.act/Erf"),
            helper.make_node("Add", [f"{p}.act.erf", "one"], [f"{p}.act.add"], name=f"{p}.act/Add"),
            helper.make_node("Mul", ["half", f"{p}.act.add"], [f"{p}.act.half"], name=f"{p}.act/Mul_1"),
            helper.make_node("Mul", [u, f"{p}.act.half"], [a], name=f"{p}.act/Mul"),
            helper.make_node("MatMul", [a, f"{p}.fc2.weight"], [f"{p}.fc2.mm"], name=f"{p}.fc2"),
            helper.make_node("Add", [f"{p}.fc2.mm", f"{p}.fc2.bias"], [f"{p}.fc2.out"], name=f"{p}.fc2/bias"),
            helper.make_node("Add", [h, f"{p}.fc2.out"], [f"layers.{i}.out"], name=f"layers.{i}/residual"),
        ]
        h = f"layers.{i}.out"
    nodes.append(helper.make_node("Identity", [h], ["y"], name="output"))
    return _finish(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [tokens, d])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [tokens, d])], inits)


EXAMPLES = {"swiglu": swiglu_stack, "gelu_mlp": gelu_mlp_stack}
