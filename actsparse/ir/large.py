"""Models of any size: copies and protobufs that never hold the weights.

A protobuf message cannot be serialized above 2 GB, and serializing a model copies every
weight it holds in memory. So nothing here turns the weights into bytes: copies share the
tensors (onnx_ir tensors are never changed in place: passes replace them), and the protobufs
handed to onnx's C++ checks and to TVM's importer carry the big initializers as graph inputs
(name, type and shape only). Tensors left in external-data files (`frontend.onnx_file.load_model`
keeps them there above 1 GB) stay memory-mapped and are read where they are used.
"""

from __future__ import annotations

import mmap

import numpy as np
import onnx
import onnx_ir as ir

# Initializers at least this large leave the protobuf. Below it they stay: scalars and small
# integer tensors (shapes, axes) must stay constants for TVM's importer and shape inference.
BIG_TENSOR_BYTES = 1 << 20


def copy_model(model: ir.Model) -> ir.Model:
    """A copy of the graph structure (nodes, values, functions) sharing the tensors.

    In place of `deserialize_model(serialize_model(model))`, which copies every weight held in
    memory, fails above 2 GB, and loses the folder that external-data tensors are read from.
    """
    return model.clone()


def tensor_bytes(model: ir.Model) -> int:
    """Bytes of the main graph's initializers, in memory or in external files (nothing is read)."""
    return sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.const_value is not None)


def has_external_tensors(model: ir.Model) -> bool:
    return any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())


def weightless_proto(model: ir.Model, min_bytes: int | None = None) -> tuple[onnx.ModelProto, list[ir.Value]]:
    """`model` as a protobuf whose initializers of at least `min_bytes` are graph inputs,
    appended after the model's own inputs, plus those initializers in that order (their
    `const_value` holds the data). Smaller external-data tensors are inlined. `model` is not
    modified. `min_bytes` defaults to BIG_TENSOR_BYTES."""
    min_bytes = BIG_TENSOR_BYTES if min_bytes is None else min_bytes
    copy = copy_model(model)
    moved = []
    for value in copy.graph.initializers.values():
        tensor = value.const_value
        if tensor is None:
            continue
        if tensor.nbytes >= min_bytes:
            moved.append(value)
        elif isinstance(tensor, ir.ExternalTensor):  # small: inline, as the file is not beside the protobuf
            value.const_value = ir.Tensor(tensor.numpy().copy(), dtype=tensor.dtype, name=tensor.name)
    if not moved:
        return ir.serde.serialize_model(copy), []
    moved_set = set(moved)
    kept_inputs = [v for v in copy.graph.inputs if v not in moved_set]
    copy.graph.inputs.clear()
    copy.graph.inputs.extend(kept_inputs)
    for value in moved:
        tensor = value.const_value
        value.shape = value.shape or ir.Shape(tensor.shape)
        value.dtype = value.dtype or tensor.dtype
        copy.graph.initializers.pop(value.name)
        copy.graph.inputs.append(value)
    proto = ir.serde.serialize_model(copy)
    originals = model.graph.initializers
    return proto, [originals[v.name] for v in moved]


def drop_pages(array: np.ndarray) -> None:
    """Let the kernel drop the resident pages of a memory-mapped (external-data) array once it
    was read: they count as the process's memory while mapped, and the mapping lives as long as
    the graph that held the tensor. The array stays valid: a read-only file mapping reads its
    pages from the file again when used. No-op for arrays in memory."""
    base = array
    while base is not None and not isinstance(base, mmap.mmap):
        base = base.obj if isinstance(base, memoryview) else getattr(base, "base", None)
    if base is not None and not base.closed and hasattr(mmap, "MADV_DONTNEED"):
        base.madvise(mmap.MADV_DONTNEED)
