"""export_torch / export_hf: what the dynamo exporter gives, numerics through onnxruntime, errors."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")

from actsparse.errors import ActsparseError  # noqa: E402
from actsparse.frontend.onnx_file import load_model, to_proto  # noqa: E402
from actsparse.frontend.torch_export import export_hf, export_torch  # noqa: E402
from tests import models  # noqa: E402


class MLP(torch.nn.Module):
    def __init__(self, act):
        super().__init__()
        self.up, self.down, self.act = torch.nn.Linear(16, 32), torch.nn.Linear(32, 16), act

    def forward(self, x):
        return self.down(self.act(self.up(x)))


def _run(model, feeds):
    session = ort.InferenceSession(to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {k: v.numpy() for k, v in feeds.items()})


def _ops(model):
    return [node.op_type for node in model.graph]


def test_linear_gelu_3d_input_is_matmul_with_transposed_weight_and_erf_gelu():
    torch.manual_seed(0)
    module, x = MLP(torch.nn.GELU()), torch.randn(1, 8, 16)
    model = export_torch(module, (x,), input_names=["x"], output_names=["y"])
    assert model.opset_imports[""] == 18
    assert _ops(model) == ["MatMul", "Add", "Div", "Erf", "Add", "Mul", "Mul", "MatMul", "Add"]
    up_weight = model.graph.node(0).inputs[1].const_value.numpy()
    np.testing.assert_array_equal(up_weight, module.up.weight.detach().numpy().T)  # [in, out]
    assert [v.name for v in model.graph.inputs] == ["x"] and list(model.graph.outputs[0].shape) == [1, 8, 16]
    (y,) = _run(model, {"x": x})
    np.testing.assert_allclose(y, module(x).detach().numpy(), rtol=1e-5, atol=1e-5)


def test_2d_input_is_gemm_transb_and_opset20_gelu_op():
    module = MLP(torch.nn.GELU(approximate="tanh"))
    model = export_torch(module, (torch.randn(4, 16),), opset=20)
    assert _ops(model) == ["Gemm", "Gelu", "Gemm"]
    gemm = model.graph.node(0)
    assert gemm.attributes["transB"].value == 1
    assert model.graph.node(1).attributes["approximate"].value == "tanh"


def test_silu_is_sigmoid_times_x():
    model = export_torch(MLP(torch.nn.SiLU()), (torch.randn(1, 4, 16),))
    assert _ops(model) == ["MatMul", "Add", "Sigmoid", "Mul", "MatMul", "Add"]


def test_dict_inputs_and_training_flag_restored():
    class Two(torch.nn.Module):
        def forward(self, a, b, scale=2.0):
            return a * scale + b

    module = Two().train()
    a, b = torch.randn(3), torch.randn(3)
    model = export_torch(module, {"a": a, "b": b, "scale": 3.0})
    assert module.training
    assert [v.name for v in model.graph.inputs] == ["a", "b"]
    (y,) = _run(model, {"a": a, "b": b})
    np.testing.assert_allclose(y, (a * 3 + b).numpy(), rtol=1e-6)


def test_dynamic_shapes_pass_through():
    batch = torch.export.Dim("batch", min=1, max=64)
    model = export_torch(MLP(torch.nn.ReLU()), (torch.randn(2, 16),), dynamic_shapes=({0: batch},))
    dim = model.graph.inputs[0].shape[0]
    assert not isinstance(dim, int)


def test_failures_are_one_line_actsparse_errors():
    with pytest.raises(ActsparseError, match=r"torch export of Linear failed: .*reduction dim") as info:
        export_torch(torch.nn.Linear(3, 4), (torch.randn(2, 5),))
    assert "\n" not in str(info.value)
    with pytest.raises(ActsparseError, match="expected a torch.nn.Module"):
        export_torch(lambda x: x, (torch.randn(2),))
    with pytest.raises(ActsparseError, match="tuple of tensors or a dict"):
        export_torch(torch.nn.ReLU(), [torch.randn(2)])


def test_hf_bert_file_matches_torch(bert_onnx):
    model = load_model(bert_onnx)
    assert [(v.name, list(v.shape)) for v in model.graph.inputs] == [("input_ids", [1, models.SEQ_LEN])]
    assert [(v.name, list(v.shape)) for v in model.graph.outputs] == [("last_hidden_state", [1, models.SEQ_LEN, 64])]
    ids = torch.randint(0, models.VOCAB, (1, models.SEQ_LEN), generator=torch.Generator().manual_seed(1))
    (y,) = _run(model, {"input_ids": ids})
    with torch.no_grad():
        expected = models.tiny_bert()(input_ids=ids).last_hidden_state.numpy()
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)


def test_hf_llama_file_has_logits_and_matches_torch(llama_onnx):
    model = load_model(llama_onnx)
    assert [v.name for v in model.graph.outputs] == ["logits"]
    ids = torch.randint(0, models.VOCAB, (1, models.SEQ_LEN), generator=torch.Generator().manual_seed(2))
    (y,) = _run(model, {"input_ids": ids})
    with torch.no_grad():
        expected = models.tiny_llama()(input_ids=ids, use_cache=False).logits.numpy()
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)


def test_hf_minilm_file(minilm_onnx):
    model = load_model(minilm_onnx)
    assert [(v.name, list(v.shape)) for v in model.graph.inputs] == [
        ("input_ids", [1, models.MINILM_SEQ_LEN]), ("attention_mask", [1, models.MINILM_SEQ_LEN])]
    assert [(v.name, list(v.shape)) for v in model.graph.outputs] == [("last_hidden_state", [1, models.MINILM_SEQ_LEN, 384])]


def test_hf_output_choice_and_errors():
    bert = models.tiny_bert()
    model = export_hf(bert, seq_len=4, output="pooler_output")
    assert [(v.name, list(v.shape)) for v in model.graph.outputs] == [("pooler_output", [1, 64])]
    assert "Tanh" in [n.op_type for n in model.graph]
    with pytest.raises(ActsparseError, match="no output 'logits'"):
        export_hf(bert, seq_len=4, output="logits")
    with pytest.raises(ActsparseError, match="no config.vocab_size"):
        export_hf(torch.nn.Linear(2, 2))
