"""Load and save ONNX files with clear errors; outputs are written atomically."""

from __future__ import annotations

from actsparse.atomic import replace_into  # noqa: E402

import math
import os
import shutil
import tempfile
from pathlib import Path

import onnx
import onnx.numpy_helper
import onnx_ir as ir

from actsparse.errors import ActsparseError
from actsparse.ir.large import has_external_tensors, tensor_bytes

# Files at least this large keep their tensors in a side file (protobuf caps at 2 GB).
EXTERNAL_DATA_THRESHOLD = 1 << 30


def load_model(path: str | os.PathLike) -> ir.Model:
    """Read an ONNX file into an `ir.Model`, refusing anything that is not a valid ONNX model."""
    path = Path(path)
    if not path.exists():
        raise ActsparseError(f"{path}: no such file")
    if path.is_dir():
        raise ActsparseError(f"{path}: is a directory, expected an .onnx file")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises several unrelated types on garbage
        raise ActsparseError(f"{path}: not a readable ONNX file ({_short(exc)})") from None
    if not proto.HasField("graph") or not proto.opset_import:
        raise ActsparseError(f"{path}: not an ONNX model (no graph or no opset)")
    _check_text_fields(proto)
    _check_external_data_paths(proto, path.parent)
    _check_tensor_data(proto, path.parent)
    try:
        # Checking by path lets the checker find external-data files next to the model.
        onnx.checker.check_model(str(path))
    except Exception as exc:
        raise ActsparseError(f"{path}: invalid ONNX model ({_short(exc)})") from None
    try:
        model = ir.serde.deserialize_model(proto)
        # Tensors stored in side files are resolved relative to the model's folder, and read
        # into memory while they fit a protobuf, so onnxruntime can take the model as bytes.
        ir.external_data.set_base_dir(model.graph, path.parent)
        if _external_bytes(proto) < EXTERNAL_DATA_THRESHOLD:
            ir.external_data.load_to_model(model)
    except ActsparseError:
        raise
    except Exception as exc:
        raise ActsparseError(f"{path}: cannot read model ({_short(exc)})") from None
    return model


def save_model(model: ir.Model, path: str | os.PathLike, *, source: str | os.PathLike | None = None) -> None:
    """Write `model` to `path` through a temp file in the same folder and a rename.

    `source` is the input file: writing over it is refused, so the input is never lost.
    """
    path = Path(path)
    if source is not None and same_file(path, Path(source)):
        raise ActsparseError(f"{path}: refusing to overwrite the input model; choose another -o")
    if path.is_dir():
        raise ActsparseError(f"{path}: is a directory")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.exists():
        raise ActsparseError(f"{folder}: output folder does not exist")
    # Large models are never serialized whole: their tensors (in memory or still in the input's
    # data file) are written to OUT.data one by one.
    proto = None
    if tensor_bytes(model) < EXTERNAL_DATA_THRESHOLD and not has_external_tensors(model):
        proto = ir.serde.serialize_model(model)
        if not _fits_protobuf(proto) or proto.ByteSize() >= EXTERNAL_DATA_THRESHOLD:
            proto = None
    if proto is None:
        _save_with_external_data(model, path, folder, source)
        return
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        onnx.save_model(proto, tmp)
        replace_into(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _save_with_external_data(model: ir.Model, path: Path, folder: Path, source) -> None:
    """Write `path` and its tensors in `path.name + ".data"`: both are written in a private
    temp folder beside them and renamed into place, the data first. Each file is replaced
    atomically; a reader between the two renames sees the new data with the old model."""
    data_name = path.name + ".data"
    inputs = [Path(source), *_external_files(Path(source))] if source is not None else []
    if any(same_file(folder / data_name, f) for f in inputs):
        raise ActsparseError(f"{folder / data_name}: the input model's data; refusing to overwrite it, choose another -o")
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=folder))
    try:
        ir.save(model, staging / path.name, external_data=data_name, size_threshold_bytes=1024)
        if (staging / data_name).exists():
            replace_into(staging / data_name, folder / data_name)
        replace_into(staging / path.name, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _external_files(model_path: Path) -> list[Path]:
    """The external-data files an ONNX file refers to (none when it cannot be read)."""
    try:
        proto = onnx.load(str(model_path), load_external_data=False)
    except Exception:
        return []
    locations = {e.value for t in _all_tensors(proto.graph) if t.data_location == onnx.TensorProto.EXTERNAL
                 for e in t.external_data if e.key == "location"}
    return [model_path.parent / location for location in locations]


def to_proto(model: ir.Model) -> onnx.ModelProto:
    """Serialize with external tensors loaded, for onnxruntime and onnx.checker."""
    return ir.serde.serialize_model(model)


def _external_bytes(proto: onnx.ModelProto) -> int:
    total = 0
    for tensor in _all_tensors(proto.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            total += int(next((e.value for e in tensor.external_data if e.key == "length"), 0) or 0)
    return total


def _check_external_data_paths(proto: onnx.ModelProto, base_dir: Path) -> None:
    """Refuse external-data locations that are absolute or escape the model's folder."""
    base = base_dir.resolve()
    for tensor in _all_tensors(proto.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        if not location or "\x00" in location:
            raise ActsparseError(f"tensor {tensor.name!r}: invalid external data path {location!r}")
        target = (base / location).resolve()
        if os.path.isabs(location) or not target.is_relative_to(base):
            raise ActsparseError(f"tensor {tensor.name!r}: external data path {location!r} escapes the model folder")
        if not target.is_file():
            raise ActsparseError(f"tensor {tensor.name!r}: external data file {location!r} not found")


def _check_text_fields(message) -> None:
    """Refuse names and other string fields that are not valid UTF-8 (protobuf hands them
    over as bytes, which every later step would trip on)."""
    for field, value in message.ListFields():
        if field.type == field.TYPE_STRING:
            for text in (value if field.is_repeated else [value]):
                if not isinstance(text, str):
                    raise ActsparseError(f"invalid ONNX model: {field.name} {text[:60]!r} is not valid UTF-8")
        elif field.type == field.TYPE_MESSAGE:
            for child in (value if field.is_repeated else [value]):
                _check_text_fields(child)


def _check_tensor_data(proto: onnx.ModelProto, base_dir: Path) -> None:
    """Refuse tensors whose data does not match their type and shape (onnx.checker does not
    look), before anything reads them: inline data is decoded once, external data must lie
    within its file."""
    for tensor in _all_tensors(proto.graph):
        where = f"tensor {tensor.name!r}"
        if any(d < 0 for d in tensor.dims):
            raise ActsparseError(f"{where}: negative dimension in {list(tensor.dims)}")
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            _check_external_extent(tensor, base_dir, where)
            continue
        try:
            onnx.numpy_helper.to_array(tensor)
        except Exception as exc:  # wrong length for the shape, unknown data type, ...
            raise ActsparseError(f"{where}: data does not match its type and shape ({_short(exc)})") from None


def _check_external_extent(tensor: onnx.TensorProto, base_dir: Path, where: str) -> None:
    """offset and length must be integers that stay inside the data file, and length must
    be the tensor's size."""
    info = {e.key: e.value for e in tensor.external_data}
    try:
        offset, length = int(info.get("offset", 0) or 0), info.get("length")
        length = int(length) if length not in (None, "") else None
        itemsize = ir.DataType(tensor.data_type).itemsize
    except (ValueError, TypeError) as exc:
        raise ActsparseError(f"{where}: invalid external data entry ({_short(exc)})") from None
    expected = math.ceil(math.prod(tensor.dims) * itemsize)
    size = (base_dir / info["location"]).stat().st_size
    if offset < 0 or (length is not None and length != expected) or offset + expected > size:
        raise ActsparseError(f"{where}: external data (offset {offset}, length {length}) does not fit "
                             f"its {expected} bytes inside {info['location']!r} ({size} bytes)")


def _all_tensors(graph: onnx.GraphProto):
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            if attr.HasField("g"):
                yield from _all_tensors(attr.g)
            for sub in attr.graphs:
                yield from _all_tensors(sub)


def _fits_protobuf(proto: onnx.ModelProto) -> bool:
    try:
        proto.ByteSize()
        return True
    except Exception:
        return False


def same_file(a: Path, b: Path) -> bool:
    """Whether `a` and `b` name one file (the same resolved path, or links to one file)."""
    try:
        return a.resolve() == b.resolve() or (a.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
