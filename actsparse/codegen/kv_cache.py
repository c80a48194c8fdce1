"""Lower a decode step's `actsparse.CachedAttention` nodes onto a KV cache held as runtime state.

Before (ONNX, runs in onnxruntime; the cache travels through the graph):
    out, present_key.i, present_value.i = CachedAttention(q, k, v, past_key.i, past_value.i)
    graph inputs past_key.i [kv, past, d]; graph outputs present_key.i, present_value.i
After (what TVM imports; the cache is a preallocated buffer the runtime owns):
    out = ActsparseDecodeAttention(q, k, v, cache_key.i, cache_value.i, position)
    graph inputs cache_key.i [kv, d, capacity] (transposed), cache_value.i [kv, capacity, d];
    no present outputs. The kernel writes this token's k, v into the buffers at `position`.

A step then costs what the current length costs (kernels/cpu/attention.py), and the runtime
passes the same two buffers per layer to every step instead of copying a growing cache.
"""

from __future__ import annotations

import onnx_ir as ir

from actsparse.codegen.lowering.ops import (DECODE_ATTENTION, LOWERING_DOMAIN, as_converter, attr_text,
                                            declare_lowering_domain)
from actsparse.errors import ActsparseError
from actsparse.ir.custom_ops import is_cached_attention

POSITION_INPUT = "position"


def cache_input_names(layer: int) -> tuple[str, str]:
    return f"cache_key.{layer}", f"cache_value.{layer}"


def lower_cached_attention(model: ir.Model, capacity: int, window: int = 0, cache_dtype: str = "float32") -> list[dict]:
    """Rewrite every CachedAttention node (see the module docstring), in place. Returns the cache
    buffers' descriptions [{name, shape, dtype}] in graph-input order, for the manifest.
    `cache_dtype` float16 stores keys and values in half the bytes (kernels/cpu/attention.py)."""
    nodes = [node for node in model.graph if is_cached_attention(node)]
    if not nodes:
        raise ActsparseError("the model has no CachedAttention node: it is not a decode step")
    position = next((v for v in model.graph.inputs if v.name == POSITION_INPUT), None)
    if position is None:
        raise ActsparseError(f"a decode step needs an input {POSITION_INPUT!r}")
    caches: list[dict] = []
    old_inputs, old_outputs = set(), set()
    for layer, node in enumerate(nodes):
        q, k, v, past_k, past_v = node.inputs
        if q.shape is None or k.shape is None or not all(isinstance(x, int) for x in (*q.shape, *k.shape)):
            raise ActsparseError(f"{node.name}: the shapes of q and k must be known to lower the attention")
        kv, _, d = (int(x) for x in k.shape)
        group = int(q.shape[1])
        key_name, value_name = cache_input_names(layer)
        element = ir.TensorType(ir.DataType.FLOAT16 if cache_dtype == "float16" else ir.DataType.FLOAT)
        key = ir.Value(name=key_name, shape=ir.Shape([kv, d, capacity]), type=element)
        value = ir.Value(name=value_name, shape=ir.Shape([kv, capacity, d]), type=element)
        model.graph.inputs.extend([key, value])
        caches += [{"name": key_name, "shape": [kv, d, capacity], "dtype": cache_dtype, "layout": "key"},
                   {"name": value_name, "shape": [kv, capacity, d], "dtype": cache_dtype, "layout": "value"}]
        attributes = {"window": ir.AttrInt64("window", window), "capacity": ir.AttrInt64("capacity", capacity),
                      "kv_heads": ir.AttrInt64("kv_heads", kv), "group": ir.AttrInt64("group", group),
                      "head_dim": ir.AttrInt64("head_dim", d), "cache_dtype": ir.AttrString("cache_dtype", cache_dtype)}
        lowered = ir.Node(LOWERING_DOMAIN, DECODE_ATTENTION, [q, k, v, key, value, position], attributes=attributes,
                          name=f"{node.name}.kernel")
        out = lowered.outputs[0]
        out.type, out.shape = ir.TensorType(ir.DataType.FLOAT), ir.Shape([kv, group, d])
        model.graph.insert_before(node, lowered)
        ir.convenience.replace_all_uses_with(node.outputs[0], out)
        old_inputs.update((past_k.name, past_v.name))
        old_outputs.update(o.name for o in node.outputs[1:])
    outputs = [o for o in model.graph.outputs if o.name not in old_outputs]
    model.graph.outputs.clear()
    model.graph.outputs.extend(outputs)
    for node in nodes:
        model.graph.remove(node, safe=False)
    inputs = [v for v in model.graph.inputs if v.name not in old_inputs]
    model.graph.inputs.clear()
    model.graph.inputs.extend(inputs)
    declare_lowering_domain(model)
    return caches


def kv_converters(target) -> dict:
    """{op name: converter} for TVM's ONNX importer (see lowering/relax_import.py `_our_converters`)."""
    from tvm import relax

    from actsparse.codegen.kernels.cpu.attention import decode_attention

    functions: dict[tuple, object] = {}

    def convert(bb, inputs, attrs, params):
        q, k, v, key, value, position = inputs
        kv, group, d = int(attrs["kv_heads"]), int(attrs["group"]), int(attrs["head_dim"])
        capacity, window = int(attrs["capacity"]), int(attrs.get("window", 0))
        dtype = attr_text(attrs.get("cache_dtype", "float32"))
        spec = (kv, group, d, capacity, window, dtype)
        if spec not in functions:
            name = f"actsparse_decode_attention_kv{kv}_g{group}_d{d}_c{capacity}_w{window}_{dtype}"
            func = decode_attention(kv, group, d, capacity, window=window, cache_dtype=dtype)
            func = func.with_attr("global_symbol", name)
            functions[spec] = bb.add_func(func, name)
        return relax.call_tir(functions[spec], [q, k, v, key, value, position],
                              relax.TensorType((kv, group, d), "float32"))

    return {DECODE_ATTENTION: as_converter(convert)}
