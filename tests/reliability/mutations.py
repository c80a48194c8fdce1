"""Hypothesis strategies that break ONNX models, at the byte level and in their structure.

A structural mutation is a function `mutate(model, folder)` that changes a copy of a
ModelProto in place (and may write side files, e.g. external data, into the case folder).
"""

from __future__ import annotations

import os
from pathlib import Path

import onnx
from hypothesis import strategies as st
from onnx import TensorProto, helper

HUGE_DIMS = [0, -1, -(2**62), 2**31, 2**40, 2**62, 2**63 - 1]
WEIRD_NAMES = ["", " ", "x", "y", "nowhere", "a/b", "../up", "\x00", "ü∂", "x" * 300]
OP_TYPES = ["MatMul", "Add", "Relu", "Gemm", "Conv", "If", "Loop", "Shape", "NoSuchOp", "", "Identity",
            "Reshape", "Gather", "Softmax", "LayerNormalization", "Scan", "Sparsify"]
DOMAINS = ["", "ai.onnx", "actsparse", "com.microsoft", "no.such.domain"]
OPSETS = [0, 1, 7, 13, 17, 21, 22, 99, 2**31]


def byte_mutation() -> st.SearchStrategy:
    """bytes -> bytes: bit flips, truncation, inserted or overwritten bytes, or garbage."""
    flips = st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 7)), min_size=1, max_size=8)
    return st.one_of(
        flips.map(lambda fs: ("flip", fs)),
        st.floats(0, 1, exclude_max=True).map(lambda f: ("truncate", f)),
        st.tuples(st.floats(0, 1), st.binary(min_size=1, max_size=32)).map(lambda t: ("insert", t)),
        st.tuples(st.floats(0, 1, exclude_max=True), st.binary(min_size=1, max_size=32)).map(lambda t: ("overwrite", t)),
        st.binary(max_size=256).map(lambda b: ("garbage", b)),
    )


def apply_bytes(data: bytes, mutation) -> bytes:
    kind, arg = mutation
    if kind == "flip":
        buffer = bytearray(data)
        for fraction, bit in arg:
            buffer[int(fraction * len(buffer))] ^= 1 << bit
        return bytes(buffer)
    if kind == "truncate":
        return data[: int(arg * len(data))]
    if kind == "insert":
        at = int(arg[0] * len(data))
        return data[:at] + arg[1] + data[at:]
    if kind == "overwrite":
        at = int(arg[0] * len(data))
        return data[:at] + arg[1] + data[at + len(arg[1]):]
    return arg


# ---------------------------------------------------------------- structural mutations

def _pick(items, fraction: float):
    return items[min(int(fraction * len(items)), len(items) - 1)] if len(items) else None


def _dims(model: onnx.ModelProto):
    values = list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info)
    return [dim for v in values if v.type.HasField("tensor_type") for dim in v.type.tensor_type.shape.dim]


def huge_dim(fraction, size):
    def mutate(model, folder):
        dim = _pick(_dims(model), fraction)
        if dim is not None:
            dim.dim_value = size
    return mutate


def dangling_input(fraction, slot, name):
    def mutate(model, folder):
        node = _pick(model.graph.node, fraction)
        if node is not None and node.input:
            node.input[slot % len(node.input)] = name
    return mutate


def cycle(first, second):
    """Feed an earlier node from a later node's output (or a node from itself)."""
    def mutate(model, folder):
        nodes = model.graph.node
        a, b = sorted((_pick(range(len(nodes)), first), _pick(range(len(nodes)), second)))
        if nodes[a].input and nodes[b].output:
            nodes[a].input[0] = nodes[b].output[0]
    return mutate


def drop_initializer(fraction):
    def mutate(model, folder):
        if model.graph.initializer:
            del model.graph.initializer[_pick(range(len(model.graph.initializer)), fraction)]
    return mutate


def retype_initializer(fraction, data_type):
    def mutate(model, folder):
        tensor = _pick(model.graph.initializer, fraction)
        if tensor is not None:
            tensor.data_type = data_type
    return mutate


def reshape_initializer(fraction, dims):
    def mutate(model, folder):
        tensor = _pick(model.graph.initializer, fraction)
        if tensor is not None:
            del tensor.dims[:]
            tensor.dims.extend(dims)
    return mutate


def cut_raw_data(fraction, keep):
    def mutate(model, folder):
        tensor = _pick(model.graph.initializer, fraction)
        if tensor is not None and tensor.raw_data:
            tensor.raw_data = tensor.raw_data[: int(keep * len(tensor.raw_data))]
    return mutate


def retype_value(fraction, elem_type, inputs):
    def mutate(model, folder):
        values = model.graph.input if inputs else model.graph.output
        value = _pick(values, fraction)
        if value is not None and value.type.HasField("tensor_type"):
            value.type.tensor_type.elem_type = elem_type
    return mutate


def duplicate_name(first, second, kind):
    def mutate(model, folder):
        g = model.graph
        if kind == "node_output" and len(g.node) > 1:
            a, b = _pick(g.node, first), _pick(g.node, second)
            b.output[0] = a.output[0]
        elif kind == "initializer" and g.initializer:
            g.initializer.append(_pick(g.initializer, first))
        elif kind == "input" and g.input:
            g.input.append(_pick(g.input, first))
        elif kind == "output" and g.output:
            g.output.append(_pick(g.output, first))
        elif kind == "input_as_initializer" and g.input and g.initializer:
            _pick(g.initializer, second).name = _pick(g.input, first).name
    return mutate


def change_op(fraction, op_type, domain):
    def mutate(model, folder):
        node = _pick(model.graph.node, fraction)
        if node is not None:
            node.op_type, node.domain = op_type, domain
    return mutate


def add_attribute(fraction, name, value):
    def mutate(model, folder):
        node = _pick(model.graph.node, fraction)
        if node is not None:
            node.attribute.append(helper.make_attribute(name, value))
    return mutate


def change_opset(version, domain, ir_version):
    def mutate(model, folder):
        del model.opset_import[:]
        model.opset_import.append(helper.make_opsetid(domain, version))
        model.ir_version = ir_version
    return mutate


def drop_outputs(count):
    def mutate(model, folder):
        del model.graph.output[: count]
    return mutate


def rename_input(fraction, name):
    def mutate(model, folder):
        value = _pick(model.graph.input, fraction)
        if value is not None:
            value.name = name
    return mutate


def external_data(fraction, location_kind, offset, length):
    """Move one initializer to a side file; the location may escape the folder or not exist."""
    def mutate(model, folder: Path):
        tensor = _pick(model.graph.initializer, fraction)
        if tensor is None or tensor.data_location == TensorProto.EXTERNAL or not tensor.raw_data:
            return
        data = bytes(tensor.raw_data)
        outside = folder.parent / "outside.bin"
        outside.write_bytes(data)
        locations = {
            "good": "weights.bin", "missing": "missing.bin", "dotdot": "../outside.bin",
            "absolute": str(outside), "nested_dotdot": "sub/../../outside.bin", "empty": "",
            "nul": "we\x00ights.bin", "folder": ".", "link": "link.bin",
        }
        location = locations[location_kind]
        (folder / "weights.bin").write_bytes(data)
        if location_kind == "link" and not (folder / "link.bin").exists():
            os.symlink(outside, folder / "link.bin")
        tensor.ClearField("raw_data")
        for field in ("float_data", "int32_data", "int64_data", "double_data"):
            tensor.ClearField(field)
        tensor.data_location = TensorProto.EXTERNAL
        del tensor.external_data[:]
        entries = {"location": location}
        if offset is not None:
            entries["offset"] = str(offset)
        if length is not None:
            entries["length"] = str(length) if length != "len" else str(len(data))
        for key, value in entries.items():
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
    return mutate


fractions = st.floats(0, 1, exclude_max=True)
data_types = st.sampled_from([0, 1, 2, 6, 7, 8, 9, 10, 11, 16, 17, 23, 99, -1])
names = st.sampled_from(WEIRD_NAMES) | st.text(max_size=12)

structural_mutation = st.one_of(
    st.builds(huge_dim, fractions, st.sampled_from(HUGE_DIMS)),
    st.builds(dangling_input, fractions, st.integers(0, 3), names),
    st.builds(cycle, fractions, fractions),
    st.builds(drop_initializer, fractions),
    st.builds(retype_initializer, fractions, data_types),
    st.builds(reshape_initializer, fractions, st.lists(st.sampled_from([0, 1, 3, 2**20, 2**40, -1]), max_size=3)),
    st.builds(cut_raw_data, fractions, fractions),
    st.builds(retype_value, fractions, data_types, st.booleans()),
    st.builds(duplicate_name, fractions, fractions,
              st.sampled_from(["node_output", "initializer", "input", "output", "input_as_initializer"])),
    st.builds(change_op, fractions, st.sampled_from(OP_TYPES), st.sampled_from(DOMAINS)),
    st.builds(add_attribute, fractions, st.sampled_from(["axis", "transB", "alpha", "bogus"]),
              st.one_of(st.integers(-2**40, 2**40), st.floats(allow_nan=True), st.text(max_size=8))),
    st.builds(change_opset, st.sampled_from(OPSETS), st.sampled_from(DOMAINS), st.sampled_from([1, 3, 7, 8, 10, 11, 99])),
    st.builds(drop_outputs, st.integers(1, 3)),
    st.builds(rename_input, fractions, names),
    st.builds(external_data, fractions,
              st.sampled_from(["good", "missing", "dotdot", "absolute", "nested_dotdot", "empty", "nul", "folder", "link"]),
              st.sampled_from([None, 0, 1, -1, 2**62, "x"]), st.sampled_from([None, "len", 0, 1, 2**62, -5, "abc"])),
)


def mutated_model_bytes(model: onnx.ModelProto, folder: Path, structure: list, bytes_mutation) -> bytes:
    """Serialize `model` after the structural mutations, then apply the byte mutation (or None)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for mutate in structure:
        mutate(copy, folder)
    data = copy.SerializeToString()
    return apply_bytes(data, bytes_mutation) if bytes_mutation is not None else data

