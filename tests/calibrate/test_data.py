"""Calibration sets: loading .npz files (stacked or single samples, every kind of bad file)
and generating deterministic inputs from a model's signature."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from actsparse.calibrate.data import embedding_rows, feeds_from_arrays, generate_calibration, load_calibration
from actsparse.errors import ActsparseError

VOCAB = 50


def _model(inputs, nodes=(), initializers=()) -> ir.Model:
    """A model with the given input value-infos; its output is the first input passed through."""
    first = inputs[0].name
    graph = helper.make_graph([*nodes, helper.make_node("Identity", [first], ["out"])], "g", list(inputs),
                              [helper.make_tensor_value_info("out", inputs[0].type.tensor_type.elem_type, None)],
                              initializer=list(initializers))
    return ir.serde.deserialize_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def _ids_and_x() -> ir.Model:
    """input_ids int64 [batch, seq] and x float32 [2, 3]."""
    return _model([helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
                   helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])])


def _save(tmp_path, **arrays):
    path = tmp_path / "calib.npz"
    np.savez(path, **arrays)
    return path


def _ids(*shape):
    return np.arange(np.prod(shape), dtype=np.int64).reshape(shape) % VOCAB


# ------------------------------------------------------------------ load_calibration

def test_stacked_samples(tmp_path):
    x = np.random.default_rng(0).standard_normal((5, 2, 3)).astype(np.float32)
    feeds = load_calibration(_save(tmp_path, input_ids=_ids(5, 1, 4), x=x), _ids_and_x())
    assert len(feeds) == 5
    for i, sample in enumerate(feeds):
        assert sample["input_ids"].shape == (1, 4) and sample["x"].shape == (2, 3)
        np.testing.assert_array_equal(sample["x"], x[i])
        assert sample["x"].flags["C_CONTIGUOUS"]


def test_single_sample(tmp_path):
    feeds = load_calibration(_save(tmp_path, input_ids=_ids(1, 4), x=np.ones((2, 3), np.float32)), _ids_and_x())
    assert len(feeds) == 1 and feeds[0]["input_ids"].shape == (1, 4)


def test_dtypes_of_the_same_kind_are_cast(tmp_path):
    feeds = load_calibration(_save(tmp_path, input_ids=_ids(1, 4).astype(np.int32), x=np.ones((2, 3))), _ids_and_x())
    assert feeds[0]["input_ids"].dtype == np.int64 and feeds[0]["x"].dtype == np.float32


@pytest.mark.parametrize("arrays, message", [
    ({"x": np.ones((2, 3), np.float32)}, r"missing inputs \['input_ids'\]"),
    ({"input_ids": _ids(1, 4), "x": np.ones((2, 3), np.float32), "extra": np.ones(1)}, r"unknown names \['extra'\]"),
    ({"input_ids": _ids(1, 4), "x": np.ones(3, np.float32)}, r"input 'x' has rank 1, model expects 2 \(or 3 stacked\)"),
    ({"input_ids": _ids(1, 4), "x": np.ones((1, 1, 2, 3), np.float32)}, "has rank 4"),
    ({"input_ids": np.ones((1, 4), np.float32), "x": np.ones((2, 3), np.float32)},
     "input 'input_ids' has dtype float32, model expects int64"),
    ({"input_ids": _ids(1, 4), "x": np.array([[1, 2, np.nan], [0, 0, 0]], np.float32)}, "'x' contains NaN or Inf"),
    ({"input_ids": _ids(1, 4), "x": np.array([[1, 2, np.inf], [0, 0, 0]], np.float32)}, "'x' contains NaN or Inf"),
    ({"input_ids": _ids(1, 4), "x": np.ones((2, 4), np.float32)}, "input 'x' axis 1 is 4, model expects 3"),
    ({"input_ids": _ids(5, 1, 4), "x": np.ones((4, 2, 3), np.float32)}, "different sample counts"),
])
def test_bad_contents(tmp_path, arrays, message):
    path = _save(tmp_path, **arrays)
    with pytest.raises(ActsparseError, match=message) as error:
        load_calibration(path, _ids_and_x())
    assert str(path) in str(error.value)


def test_zero_stacked_samples(tmp_path):
    path = _save(tmp_path, input_ids=_ids(0, 1, 4), x=np.ones((0, 2, 3), np.float32))
    with pytest.raises(ActsparseError, match="no samples"):
        load_calibration(path, _ids_and_x())


@pytest.mark.parametrize("content", [b"input_ids,x\n1,2\n", bytes(np.random.default_rng(0).integers(0, 256, 500,
                                                                                                    dtype=np.uint8))])
def test_not_a_zip(tmp_path, content):
    path = tmp_path / "calib.npz"
    path.write_bytes(content)
    with pytest.raises(ActsparseError, match="not a readable .npz calibration file"):
        load_calibration(path, _ids_and_x())


def test_truncated_npz(tmp_path):
    path = _save(tmp_path, input_ids=_ids(1, 4), x=np.ones((2, 3), np.float32))
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ActsparseError, match="not a readable .npz"):
        load_calibration(path, _ids_and_x())


def test_pickled_arrays_are_refused(tmp_path):
    path = _save(tmp_path, input_ids=np.array([{"a": 1}], dtype=object), x=np.ones((2, 3), np.float32))
    with pytest.raises(ActsparseError, match="not a readable .npz"):
        load_calibration(path, _ids_and_x())


def test_missing_file(tmp_path):
    with pytest.raises(ActsparseError, match="no such calibration file"):
        load_calibration(tmp_path / "nope.npz", _ids_and_x())
    with pytest.raises(ActsparseError, match="no such calibration file"):
        load_calibration(tmp_path, _ids_and_x())  # a folder


def test_npy_file_is_a_clear_error(tmp_path):
    path = tmp_path / "calib.npy"
    np.save(path, np.ones((2, 3), np.float32))
    with pytest.raises(ActsparseError, match="npz"):
        load_calibration(path, _ids_and_x())


def test_feeds_from_arrays_ignores_initializers_listed_as_inputs():
    w = numpy_helper.from_array(np.ones(3, np.float32), "w")
    model = _model([helper.make_tensor_value_info("x", TensorProto.FLOAT, [3]),
                    helper.make_tensor_value_info("w", TensorProto.FLOAT, [3])], initializers=[w])
    feeds = feeds_from_arrays({"x": np.zeros(3, np.float32)}, model)
    assert list(feeds[0]) == ["x"]


# ------------------------------------------------------------------ generate_calibration

def _token_model(ids_dtype=TensorProto.INT64) -> ir.Model:
    """BERT-like signature: ids (through a Cast when int32) index an embedding table of VOCAB rows."""
    table = numpy_helper.from_array(np.zeros((VOCAB, 4), np.float32), "embeddings")
    nodes, ids = [], "input_ids"
    if ids_dtype != TensorProto.INT64:
        nodes.append(helper.make_node("Cast", ["input_ids"], ["ids64"], to=TensorProto.INT64))
        ids = "ids64"
    nodes.append(helper.make_node("Gather", ["embeddings", ids], ["emb"]))
    inputs = [helper.make_tensor_value_info("input_ids", ids_dtype, ["batch", "seq"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]),
              helper.make_tensor_value_info("token_type_ids", TensorProto.INT64, ["batch", "seq"]),
              helper.make_tensor_value_info("position_ids", TensorProto.INT64, [1, "seq"]),
              helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", 3, 2]),
              helper.make_tensor_value_info("use_cache", TensorProto.BOOL, [])]
    return _model(inputs, nodes, [table])


def test_generated_inputs_follow_the_signature():
    samples = generate_calibration(_token_model(), 3, sequence_length=7, seed=0)
    assert len(samples) == 3
    for sample in samples:
        ids = sample["input_ids"]
        assert ids.shape == (1, 7) and ids.dtype == np.int64
        assert ids.min() >= VOCAB // 4 and ids.max() < VOCAB  # below the vocabulary, above special tokens
        assert sample["attention_mask"].dtype == np.int64 and (sample["attention_mask"] == 1).all()
        assert (sample["token_type_ids"] == 0).all()
        np.testing.assert_array_equal(sample["position_ids"], np.arange(7)[None])
        assert sample["pixel_values"].shape == (1, 3, 2) and sample["pixel_values"].dtype == np.float32
        assert sample["use_cache"].dtype == np.bool_ and sample["use_cache"].all()
    assert not np.array_equal(samples[0]["input_ids"], samples[1]["input_ids"])


def test_generation_is_deterministic_with_a_seed():
    model = _token_model()
    a, b = generate_calibration(model, 2, seed=5), generate_calibration(model, 2, seed=5)
    c = generate_calibration(model, 2, seed=6)
    for x, y in zip(a, b):
        assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
    assert not np.array_equal(a[0]["input_ids"], c[0]["input_ids"])
    assert not np.array_equal(a[0]["pixel_values"], c[0]["pixel_values"])


def test_vocabulary_is_found_through_a_cast():
    model = _token_model(TensorProto.INT32)
    assert embedding_rows(model, model.graph.inputs[0]) == VOCAB
    ids = generate_calibration(model, 4)[0]["input_ids"]
    assert ids.dtype == np.int32 and ids.max() < VOCAB


def test_unknown_vocabulary_defaults_to_100():
    model = _model([helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, 64])])
    ids = np.concatenate([s["input_ids"] for s in generate_calibration(model, 4)])
    assert ids.min() >= 25 and ids.max() < 100


def test_tiny_transformer_ids_are_below_its_vocabulary(llama_onnx):
    from actsparse.frontend.onnx_file import load_model
    from tests.models import SEQ_LEN
    from tests.models import VOCAB as MODEL_VOCAB

    samples = generate_calibration(load_model(llama_onnx), 4)
    ids = np.concatenate([s["input_ids"] for s in samples])
    assert ids.shape == (4, SEQ_LEN) and ids.max() < MODEL_VOCAB and ids.min() >= MODEL_VOCAB // 4


def test_input_of_unknown_rank_cannot_be_generated():
    model = _model([helper.make_tensor_value_info("x", TensorProto.FLOAT, None)])
    with pytest.raises(ActsparseError, match="input 'x' has unknown rank; give calibration data with --calib"):
        generate_calibration(model, 1)


def test_calibrate_modules_import_on_their_own():
    """Each module imports first in a fresh interpreter (no circular import with actsparse.passes)."""
    for module in ("actsparse.calibrate.data", "actsparse.calibrate"):
        subprocess.run([sys.executable, "-c", f"import {module}"], check=True)


def test_documented_casts_and_refusals(tmp_path):
    """float64 / big-endian float32 are cast (documented); integers only when they fit; kinds never mix."""
    import onnx_ir as ir

    from actsparse.frontend import zoo
    from actsparse.calibrate.data import feeds_from_arrays
    from actsparse.errors import ActsparseError

    model = ir.serde.deserialize_model(zoo.swiglu_stack(layers=1, d=8, f=16))
    x = np.random.default_rng(0).standard_normal((1, 8))
    for array in (x, x.astype(">f4")):
        feeds = feeds_from_arrays({"x": array}, model)
        assert feeds[0]["x"].dtype == np.float32 and feeds[0]["x"].dtype.isnative
        np.testing.assert_allclose(feeds[0]["x"], x.astype(np.float32))
    with pytest.raises(ActsparseError, match="model expects float32"):
        feeds_from_arrays({"x": x.astype(np.int64)}, model)
    with pytest.raises(ActsparseError, match="beyond float32's range"):
        feeds_from_arrays({"x": np.full((1, 8), 1e300)}, model)


def test_a_compressed_npz_of_the_wrong_shape_is_refused_before_it_is_decompressed(tmp_path):
    """18 MB on disk can be gigabytes decompressed: the headers are checked first."""
    script = f"""
import resource, sys, numpy as np, onnx_ir as ir
from actsparse.frontend import zoo
from actsparse.calibrate.data import load_calibration
from actsparse.errors import ActsparseError
np.savez_compressed({str(tmp_path / 'big.npz')!r}, x=np.zeros((60000, 1, 4096), np.float32))  # ~1 GB of zeros
model = ir.serde.deserialize_model(zoo.swiglu_stack(layers=1, d=8, f=16))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    load_calibration({str(tmp_path / 'big.npz')!r}, model)
except ActsparseError as exc:
    print("refused:", exc)
print("grew_mb", (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "refused:" in done.stdout and "axis 1 is 4096, model expects 8" in done.stdout
    grew = float(done.stdout.split("grew_mb")[1])
    assert grew < 200, f"RSS grew {grew} MB refusing the file"
