"""find_linears / find_blocks on real exporter output (dynamo and TorchScript) and hand-built graphs."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from actsparse.frontend.onnx_file import load_model
from actsparse.ir.blocks import find_blocks, find_linears
from tests import models

LAYERS = range(models.LAYERS)


def _modules(linears):
    return [lin.module for lin in linears]


def test_bert_dynamo(bert_onnx):
    blocks = find_blocks(load_model(bert_onnx))
    assert len(blocks.linears) == 12  # the pooler went with its output
    assert [b.name for b in blocks.ffn] == [f"encoder.layer.{i}.mlp" for i in LAYERS]
    for i, ffn in zip(LAYERS, blocks.ffn):
        assert ffn.kind == "mlp" and ffn.gate is None
        assert (ffn.up.module, ffn.down.module) == tuple(p.format(i=i) for p in models.BERT_FFN)
        assert ffn.activation.kind == "gelu"
        assert [n.op_type for n in ffn.activation.nodes] == ["Div", "Erf", "Add", "Mul", "Mul"]  # opset 18
        assert ffn.hidden is ffn.down.input is ffn.activation.output
        assert ffn.activation.input is ffn.up.output
        # nn.Linear on 3-D input: MatMul with the weight transposed at export, then Add(bias).
        assert ffn.up.node.op_type == "MatMul" and ffn.up.weight_layout == "KN"
        assert (ffn.up.in_features, ffn.up.out_features, ffn.down.out_features) == (64, 128, 64)
        assert ffn.up.bias is not None and ffn.up.bias_node.op_type == "Add"
    assert [b.name for b in blocks.attention] == [f"encoder.layer.{i}.attention" for i in LAYERS]
    for i, att in zip(LAYERS, blocks.attention):
        prefix = f"encoder.layer.{i}.attention"
        assert _modules([att.q, att.k, att.v, att.o]) == [
            f"{prefix}.self.query", f"{prefix}.self.key", f"{prefix}.self.value", f"{prefix}.output.dense"]
        assert not att.fused_qkv and att.softmax.op_type == "Softmax"


def test_bert_torchscript(bert_torchscript_onnx):
    blocks = find_blocks(load_model(bert_torchscript_onnx))
    assert len(blocks.linears) == 12
    assert [b.name for b in blocks.ffn] == [f"bert.encoder.layer.{i}.mlp" for i in LAYERS]
    for i, ffn in zip(LAYERS, blocks.ffn):
        assert ffn.up.name == f"/bert/encoder/layer.{i}/intermediate/dense/MatMul"
        assert ffn.down.name == f"/bert/encoder/layer.{i}/output/dense/MatMul"
        assert ffn.up.module == f"bert.encoder.layer.{i}.intermediate.dense"
        assert ffn.activation.kind == "gelu"
        # Erf decomposition with its three scalar Constant nodes.
        assert sorted(n.op_type for n in ffn.activation.nodes) == sorted(
            ["Constant"] * 3 + ["Div", "Erf", "Add", "Mul", "Mul"])
        # Biases are shared initializers behind Identity nodes; still found.
        assert ffn.up.bias is not None and ffn.up.bias_array().shape == (128,)
    assert [b.name for b in blocks.attention] == [f"bert.encoder.layer.{i}.attention" for i in LAYERS]
    att = blocks.attention[0]
    assert [x.name for x in (att.q, att.k, att.v, att.o)] == [
        "/bert/encoder/layer.0/attention/self/query/MatMul", "/bert/encoder/layer.0/attention/self/key/MatMul",
        "/bert/encoder/layer.0/attention/self/value/MatMul", "/bert/encoder/layer.0/attention/output/dense/MatMul"]


def test_bert_exporters_agree_on_weights(bert_onnx, bert_torchscript_onnx):
    dynamo = find_blocks(load_model(bert_onnx)).ffn
    script = find_blocks(load_model(bert_torchscript_onnx)).ffn
    for a, b in zip(dynamo, script):
        np.testing.assert_array_equal(a.up.weight_array("KN"), b.up.weight_array("KN"))
        np.testing.assert_array_equal(a.down.bias_array(), b.down.bias_array())


def test_gpt2(gpt2_onnx):
    blocks = find_blocks(load_model(gpt2_onnx))
    assert len(blocks.linears) == 9  # 4 per layer + the tied lm_head
    assert blocks.linears[-1].module == "lm_head"
    assert [b.name for b in blocks.ffn] == [f"transformer.h.{i}.mlp" for i in LAYERS]
    for i, ffn in zip(LAYERS, blocks.ffn):
        assert (ffn.up.module, ffn.down.module) == tuple(p.format(i=i) for p in models.GPT2_FFN)
        assert ffn.activation.kind == "gelu_tanh"  # GPT-2's gelu_new, written out with Pow and Tanh
        # Conv1D is addmm: a Gemm on the flattened tokens with a [in, out] weight, Reshapes around it.
        assert ffn.up.node.op_type == "Gemm" and ffn.up.weight_layout == "KN"
        assert ffn.hidden is ffn.down.input and ffn.hidden.producer().op_type == "Reshape"
        assert (ffn.up.in_features, ffn.up.out_features) == (64, 256)
    assert [b.name for b in blocks.attention] == [f"transformer.h.{i}.attn" for i in LAYERS]
    for i, att in zip(LAYERS, blocks.attention):
        assert att.fused_qkv and att.q is att.k is att.v
        assert att.q.module == f"transformer.h.{i}.attn.c_attn" and att.q.out_features == 192
        assert att.o.module == f"transformer.h.{i}.attn.c_proj"


def test_llama(llama_onnx):
    blocks = find_blocks(load_model(llama_onnx))
    assert len(blocks.linears) == 15  # 7 per layer + lm_head
    assert [b.name for b in blocks.ffn] == [f"model.layers.{i}.mlp" for i in LAYERS]
    for i, ffn in zip(LAYERS, blocks.ffn):
        assert ffn.kind == "gated"
        assert _modules([ffn.gate, ffn.up, ffn.down]) == [p.format(i=i) for p in models.LLAMA_FFN]
        assert ffn.activation.kind == "silu" and ffn.activation.input is ffn.gate.output
        assert ffn.hidden.producer().op_type == "Mul"
        assert (ffn.up.out_features, ffn.down.in_features) == (176, 176)
        assert ffn.up.bias is None
    assert [b.name for b in blocks.attention] == [f"model.layers.{i}.self_attn" for i in LAYERS]
    att = blocks.attention[1]
    assert _modules([att.q, att.k, att.v, att.o]) == [
        f"model.layers.1.self_attn.{p}_proj" for p in ("q", "k", "v", "o")]
    assert (att.q.out_features, att.k.out_features, att.v.out_features) == (64, 32, 32)  # GQA
    assert not att.fused_qkv


def test_minilm(minilm_onnx):
    blocks = find_blocks(load_model(minilm_onnx))
    assert len(blocks.linears) == 36
    assert [b.name for b in blocks.ffn] == [f"encoder.layer.{i}.mlp" for i in range(6)]
    assert {(f.up.in_features, f.up.out_features, f.down.out_features) for f in blocks.ffn} == {(384, 1536, 384)}
    assert {f.activation.kind for f in blocks.ffn} == {"gelu"}
    assert [b.name for b in blocks.attention] == [f"encoder.layer.{i}.attention" for i in range(6)]


def test_swiglu_stack(swiglu_stack_onnx):
    blocks = find_blocks(load_model(swiglu_stack_onnx))
    assert blocks.attention == []
    assert [b.name for b in blocks.ffn] == ["layers.0.mlp", "layers.1.mlp"]
    for i, ffn in enumerate(blocks.ffn):
        assert [x.name for x in (ffn.gate, ffn.up, ffn.down)] == [
            f"layers.{i}.mlp.gate_proj", f"layers.{i}.mlp.up_proj", f"layers.{i}.mlp.down_proj"]
        assert ffn.kind == "gated" and ffn.activation.kind == "silu"
        assert [n.name for n in ffn.activation.nodes] == [f"layers.{i}.mlp.act_fn/Sigmoid", f"layers.{i}.mlp.act_fn/Mul"]
        assert ffn.hidden.name == f"layers.{i}.mlp.hidden"
    assert blocks.get("layers.1.mlp") is blocks.ffn[1]
    with pytest.raises(KeyError):
        blocks.get("layers.2.mlp")


def test_gelu_mlp_stack(gelu_mlp_stack_onnx):
    blocks = find_blocks(load_model(gelu_mlp_stack_onnx))
    assert [b.name for b in blocks.ffn] == ["layers.0.mlp", "layers.1.mlp"]
    for i, ffn in enumerate(blocks.ffn):
        assert (ffn.up.name, ffn.down.name) == (f"layers.{i}.mlp.fc1", f"layers.{i}.mlp.fc2")
        assert ffn.kind == "mlp" and ffn.activation.kind == "gelu" and len(ffn.activation.nodes) == 5
        assert ffn.up.node.op_type == "Gemm" and ffn.up.weight_layout == "NK"
        assert ffn.up.weight.name == f"layers.{i}.mlp.fc1.weight"
        assert ffn.down.weight_layout == "KN" and ffn.down.bias_node.name == f"layers.{i}.mlp.fc2/bias"
        assert ffn.down.output is ffn.down.bias_node.outputs[0]


# ------------------------------------------------------------------ linears, small graphs

def _model(nodes, inits, x_shape=(2, 3), inputs=()):
    graph = helper.make_graph(
        nodes, "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(x_shape)), *inputs],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        initializer=[numpy_helper.from_array(a, n) for n, a in inits.items()],
    )
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]))


W = np.arange(12, dtype=np.float32).reshape(3, 4)  # [in=3, out=4]
N = helper.make_node


@pytest.mark.parametrize("nodes,inits,layout", [
    ([N("MatMul", ["x", "w"], ["y"])], {"w": W}, "KN"),
    ([N("Transpose", ["wt"], ["w"], perm=[1, 0]), N("MatMul", ["x", "w"], ["y"])], {"wt": W.T.copy()}, "NK"),
    ([N("Gemm", ["x", "w"], ["y"])], {"w": W}, "KN"),
    ([N("Gemm", ["x", "wt"], ["y"], transB=1)], {"wt": W.T.copy()}, "NK"),
    ([N("Cast", ["w16"], ["w"], to=TensorProto.FLOAT), N("MatMul", ["x", "w"], ["y"])], {"w16": W.astype(np.float16)}, "KN"),
])
def test_linear_weight_layouts(nodes, inits, layout):
    (linear,) = find_linears(_model(nodes, inits))
    assert linear.weight_layout == layout
    assert (linear.in_features, linear.out_features) == (3, 4)
    np.testing.assert_array_equal(linear.weight_array("KN"), W)
    np.testing.assert_array_equal(linear.weight_array("NK"), W.T)
    assert linear.input.name == "x" and linear.output.name == "y"
    assert linear.weight.name == next(iter(inits))


def test_matmul_bias_add_is_part_of_the_linear():
    b = np.arange(4, dtype=np.float32)
    model = _model([N("MatMul", ["x", "w"], ["h"], name="mm"), N("Add", ["b", "h"], ["y"], name="bias")], {"w": W, "b": b})
    (linear,) = find_linears(model)
    assert linear.name == "mm" and linear.bias_node.name == "bias" and linear.output.name == "y"
    np.testing.assert_array_equal(linear.bias_array(), b)


def test_not_linears():
    # Activation x activation, a weight fed as a graph input, and a wrong-length "bias".
    other = helper.make_tensor_value_info("z", TensorProto.FLOAT, [3, 4])
    model = _model([N("MatMul", ["x", "z"], ["y"])], {}, inputs=[other])
    assert find_linears(model) == []
    model = _model([N("MatMul", ["x", "w"], ["h"]), N("Add", ["h", "b"], ["y"])], {"w": W, "b": np.ones(3, np.float32)})
    (linear,) = find_linears(model)
    assert linear.bias is None and linear.output.name == "h"


def test_blocks_without_module_names_are_numbered():
    f = 6
    inits = {"w1": np.ones((3, f), np.float32), "w2": np.ones((f, 3), np.float32)}
    nodes = [N("MatMul", ["x", "w1"], ["h"], name="a"), N("Relu", ["h"], ["r"]), N("MatMul", ["r", "w2"], ["y"], name="b")]
    (ffn,) = find_blocks(_model(nodes, inits)).ffn
    assert ffn.name == "ffn.0" and ffn.activation.kind == "relu" and ffn.kind == "mlp"


def test_linear_followed_by_no_activation_is_not_an_ffn():
    inits = {"w1": np.ones((3, 6), np.float32), "w2": np.ones((6, 3), np.float32)}
    nodes = [N("MatMul", ["x", "w1"], ["h"]), N("Exp", ["h"], ["e"]), N("MatMul", ["e", "w2"], ["y"])]
    assert find_blocks(_model(nodes, inits)).ffn == []


def test_weight_shared_flags_tied_weights():
    nodes = [N("MatMul", ["x", "w"], ["h"]), N("MatMul", ["x", "w"], ["h2"]), N("Add", ["h", "h2"], ["y"])]
    first, second = find_linears(_model(nodes, {"w": W}))
    assert first.weight_shared and second.weight_shared
    (alone,) = find_linears(_model([N("MatMul", ["x", "w"], ["y"])], {"w": W}))
    assert not alone.weight_shared
