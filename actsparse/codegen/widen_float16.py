"""Compile float16 models in float32: the CPU kernels (and the CPUs) have no fp16 arithmetic.

Before: fp16 initializers, Constants and Casts to fp16; graph inputs/outputs fp16.
After:  the same graph in float32: initializers and Constant values widened, Casts to fp16 now to
        fp32, a Cast to fp32 after each fp16 graph input and a Cast back to fp16 before each fp16
        graph output, so the artifact keeps the model's interface. Weights then take the project's
        float32 kernels (fp16 models used to fall back to TVM's generic ones).
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from actsparse.ir.custom_ops import unique_name, unique_node_name

F16, F32 = ir.DataType.FLOAT16, ir.DataType.FLOAT


def is_float16_model(model: ir.Model) -> bool:
    values = [*model.graph.inputs, *model.graph.outputs, *model.graph.initializers.values()]
    return any(v.dtype == F16 for v in values)


def widen_float16(model: ir.Model) -> bool:
    """Rewrite `model` in place (see the module docstring); False when it has no float16."""
    if not is_float16_model(model):
        return False
    float16_outputs = {id(v) for v in model.graph.outputs if v.dtype == F16}
    float16_inputs = {id(v) for v in model.graph.inputs if v.dtype == F16}
    for value in model.graph.initializers.values():
        if value.dtype == F16 and value.const_value is not None:
            value.const_value = ir.tensor(value.const_value.numpy().astype(np.float32), name=value.name)
            value.type = ir.TensorType(F32)
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        if node.op_type == "Cast" and node.attributes.get_int("to", 0) == F16.value:
            node.attributes["to"] = ir.AttrInt64("to", F32.value)
        if node.op_type in ("Constant", "ConstantOfShape") and "value" in node.attributes:
            tensor = node.attributes["value"].as_tensor()
            if tensor.dtype == F16:
                node.attributes["value"] = ir.AttrTensor("value", ir.tensor(tensor.numpy().astype(np.float32)))
        for output in node.outputs:
            if output.dtype == F16:
                output.type = ir.TensorType(F32)
    first = next(iter(model.graph), None)
    for value in model.graph.inputs:
        if id(value) not in float16_inputs or value.name in model.graph.initializers:
            continue
        cast = ir.Node("", "Cast", [value], attributes={"to": ir.AttrInt64("to", F32.value)},
                       name=unique_node_name(model, f"{value.name}/to_float32"))
        widened = cast.outputs[0]
        widened.name, widened.type, widened.shape = unique_name(model, f"{value.name}.float32"), ir.TensorType(F32), value.shape
        for use in list(value.uses()):
            if use.node is not cast:
                use.node.replace_input_with(use.idx, widened)
        if first is not None:
            model.graph.insert_before(first, cast)
        else:
            model.graph.append(cast)
    for index, value in enumerate(list(model.graph.outputs)):
        if id(value) not in float16_outputs:
            continue
        cast = ir.Node("", "Cast", [value], attributes={"to": ir.AttrInt64("to", F16.value)},
                       name=unique_node_name(model, f"{value.name}/to_float16"))
        model.graph.append(cast)
        narrowed = cast.outputs[0]
        name = value.name
        value.name = unique_name(model, f"{name}.float32")
        narrowed.name, narrowed.type, narrowed.shape = name, ir.TensorType(F16), value.shape
        model.graph.outputs[index] = narrowed
    return True
