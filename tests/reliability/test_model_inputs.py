"""Guards on ONNX files that the fuzz tests hit at random, here one by one with their messages."""

from __future__ import annotations

import os

import onnx
import pytest
from onnx import TensorProto

from actsparse.frontend import zoo
from actsparse.errors import ActsparseError
from actsparse.frontend.onnx_file import load_model


def _with_external(tmp_path, location: str, *, offset=None, length=None):
    proto = zoo.swiglu_stack(layers=1, d=8, f=16)
    tensor = proto.graph.initializer[0]
    data = bytes(tensor.raw_data)
    (tmp_path / "outside.bin").write_bytes(data)
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(data)
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in {"location": location, "offset": offset, "length": length}.items():
        if value is not None:
            entry = tensor.external_data.add()
            entry.key, entry.value = key, str(value)
    (folder / "m.onnx").write_bytes(proto.SerializeToString())
    return folder / "m.onnx"


@pytest.mark.parametrize("location, message", [
    ("../outside.bin", "escapes the model folder"),
    ("sub/../../outside.bin", "escapes the model folder"),
    ("ABSOLUTE", "escapes the model folder"),
    ("LINK", "escapes the model folder"),
    ("we\x00ights.bin", "invalid external data path"),
    ("missing.bin", "not found"),
])
def test_external_data_outside_the_folder_is_refused(tmp_path, location, message):
    if location == "ABSOLUTE":
        location = str(tmp_path / "outside.bin")
    if location == "LINK":
        location = "link.bin"
    path = _with_external(tmp_path, location)
    if location == "link.bin":
        os.symlink(tmp_path / "outside.bin", path.parent / "link.bin")
    with pytest.raises(ActsparseError, match=message):
        load_model(path)


@pytest.mark.parametrize("offset, length", [(0, 3), (10**12, None), (-4, None), ("x", None), (None, "abc")])
def test_external_data_extent_must_fit_its_file(tmp_path, offset, length):
    with pytest.raises(ActsparseError, match=r"external data"):
        load_model(_with_external(tmp_path, "weights.bin", offset=offset, length=length))


def test_external_data_inside_the_folder_loads(tmp_path):
    assert load_model(_with_external(tmp_path, "weights.bin")) is not None


def test_tensor_data_not_matching_its_type_is_refused(tmp_path):
    proto = zoo.gelu_mlp_stack(layers=1, d=8, f=16)
    proto.graph.initializer[0].data_type = TensorProto.UINT8  # 4 bytes of float32 sqrt2, read as 1 x uint8 ()
    (tmp_path / "m.onnx").write_bytes(proto.SerializeToString())
    with pytest.raises(ActsparseError, match=r"tensor 'sqrt2': data does not match its type and shape"):
        load_model(tmp_path / "m.onnx")


def test_names_that_are_not_utf8_are_refused(tmp_path):
    data = zoo.swiglu_stack(layers=1, d=8, f=16).SerializeToString()
    at = data.index(b"layers.0.mlp.gate_proj")
    (tmp_path / "m.onnx").write_bytes(data[:at] + b"\x80" + data[at + 1:])
    with pytest.raises(ActsparseError, match=r"is not valid UTF-8"):
        load_model(tmp_path / "m.onnx")
