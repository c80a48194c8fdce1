"""Load and save ONNX files with clear errors; outputs are written atomically."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx
import onnx_ir as ir

from actsparse.errors import ActsparseError

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
    _check_external_data_paths(proto, path.parent)
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
    if source is not None and _same_file(path, Path(source)):
        raise ActsparseError(f"{path}: refusing to overwrite the input model; choose another -o")
    if path.is_dir():
        raise ActsparseError(f"{path}: is a directory")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.exists():
        raise ActsparseError(f"{folder}: output folder does not exist")
    proto = ir.serde.serialize_model(model)
    large = proto.ByteSize() >= EXTERNAL_DATA_THRESHOLD if _fits_protobuf(proto) else True
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    tmp_data = None
    try:
        if large:
            tmp_data = tmp + ".data"
            onnx.save_model(
                proto, tmp, save_as_external_data=True, all_tensors_to_one_file=True,
                location=path.name + ".data", size_threshold=1024,
            )
        else:
            onnx.save_model(proto, tmp)
        if large:
            os.replace(folder / (path.name + ".data"), folder / (path.name + ".data"))
        os.replace(tmp, path)
    except BaseException:
        for leftover in (tmp, tmp_data):
            if leftover and os.path.exists(leftover):
                os.unlink(leftover)
        raise


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
        target = (base / location).resolve()
        if os.path.isabs(location) or not target.is_relative_to(base):
            raise ActsparseError(f"tensor {tensor.name!r}: external data path {location!r} escapes the model folder")
        if not target.is_file():
            raise ActsparseError(f"tensor {tensor.name!r}: external data file {location!r} not found")


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


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:200] if text else type(exc).__name__
