"""cleanup: Before/Expected structure, and `optimize --passes cleanup` round-trips through onnxruntime."""

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from actsparse.cli import main
from actsparse.passes import make_pass
from tests.onnx_models import if_model, loop_model, mlp_with_foldable_constants, random_feeds, run_ort


def _optimize_cleanup(tmp_path, model: onnx.ModelProto, name="m", **save_kwargs):
    src, dst = tmp_path / f"{name}.onnx", tmp_path / f"{name}.out.onnx"
    onnx.save_model(model, src, **save_kwargs)
    assert main(["optimize", str(src), "-o", str(dst), "--passes", "cleanup"]) == 0
    return src, dst


def _assert_same_outputs(src, dst, feeds):
    for expected, actual in zip(run_ort(src, feeds), run_ort(dst, feeds)):
        np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)


def test_before_expected_folds_constants_and_removes_dead_code():
    before = ir.serde.deserialize_model(mlp_with_foldable_constants())
    after = make_pass("cleanup")(before).model
    ops = [node.op_type for node in after.graph]
    # Expected: MatMul -> Add(folded bias) -> Relu -> MatMul; Constant, Mul, Identity, Neg gone.
    assert ops == ["MatMul", "Add", "Relu", "MatMul"]
    bias = after.graph.node(1).inputs[1]
    np.testing.assert_array_equal(bias.const_value.numpy(), np.full(16, 0.5, np.float32))


@pytest.mark.parametrize("opset", [13, 14, 15, 16, 17, 18, 19, 20, 21])
def test_roundtrip_across_opsets_with_dynamic_batch(tmp_path, opset):
    model = mlp_with_foldable_constants(opset=opset, dynamic_batch=True)
    src, dst = _optimize_cleanup(tmp_path, model)
    assert onnx.load(dst).opset_import[0].version == opset
    for batch in (1, 5):  # the dynamic dim stays dynamic
        _assert_same_outputs(src, dst, random_feeds(model, dynamic=batch))


@pytest.mark.parametrize("build", [if_model, loop_model])
def test_roundtrip_control_flow(tmp_path, build):
    model = build()
    src, dst = _optimize_cleanup(tmp_path, model)
    feeds = random_feeds(model)
    _assert_same_outputs(src, dst, feeds)
    if "cond" in feeds:
        _assert_same_outputs(src, dst, feeds | {"cond": np.array(False)})
    assert any(n.op_type in ("If", "Loop") for n in onnx.load(dst).graph.node)


def test_roundtrip_external_data(tmp_path):
    model = mlp_with_foldable_constants()
    src, dst = _optimize_cleanup(tmp_path, model, save_as_external_data=True, all_tensors_to_one_file=True,
                                 location="m.weights", size_threshold=0)
    assert (tmp_path / "m.weights").exists()
    _assert_same_outputs(src, dst, random_feeds(model))


def test_roundtrip_torch_cnn_both_exporters(tmp_path):
    torch = pytest.importorskip("torch")

    class SmallCNN(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.features = torch.nn.Sequential(
                torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
                torch.nn.MaxPool2d(2), torch.nn.Conv2d(8, 16, 3), torch.nn.BatchNorm2d(16), torch.nn.GELU(),
                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(16, 10),
            )

        def forward(self, x):
            return self.features(x)

    torch.manual_seed(0)
    net = SmallCNN().eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for bn in (net.features[1], net.features[5]):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 16, 16)
    for dynamo in (True, False):
        src = tmp_path / f"cnn_{dynamo}.onnx"
        torch.onnx.export(net, (x,), str(src), dynamo=dynamo, input_names=["x"], output_names=["y"])
        dst = tmp_path / f"cnn_{dynamo}.out.onnx"
        assert main(["optimize", str(src), "-o", str(dst)]) == 0
        feeds = {"x": x.numpy()}
        _assert_same_outputs(src, dst, feeds)
        np.testing.assert_allclose(run_ort(dst, feeds)[0], net(x).detach().numpy(), rtol=1e-4, atol=1e-4)
