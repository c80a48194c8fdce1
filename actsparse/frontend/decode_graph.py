"""Build the one-token decode step of a causal LM as an ONNX graph, from a `DecoderSpec`.

    inputs:  input_ids int64 [1, 1], position int64 [1],
             past_key.{i}, past_value.{i} float32 [kv_heads, past, head_dim] per layer
    outputs: logits float32 [1, vocab], present_key.{i}, present_value.{i} [kv_heads, past + 1, head_dim]

Per layer, on a [1, hidden] row (2-D, as the FFN fusion and block discovery expect):
    h = norm(x) (RMSNorm, or LayerNorm); q, k, v = h @ Wq, h @ Wk, h @ Wv (+ bias); RoPE(q, k) on
    the first rotary dims of each head, from the model's own cos/sin tables gathered at `position`;
    out = actsparse.CachedAttention(q * scale, k, v, past); attn = out @ Wo (+ bias);
    ffn(h) = down(act(gate(h)) * up(h)) or down(act(up(h))) (+ biases);
    sequential x += attn; x += ffn(norm2(x)), or parallel x += attn + ffn(norm2(x) or h), or
    post-norm (OPT-350m) x = norm(x + attn(x)); x = norm2(x + ffn(x)) -- `DecoderSpec.residual`.
Learned absolute positions (OPT) are added to the embedding rows; OPT's project_in / project_out
linears sit after the embedding and before the head.
Every linear is a MatMul named after its module (`layers.0.mlp.gate_proj`), with the weight
stored [in, out], so `sparsify`, `quantize`, ... find and rewrite them like any other graph's.
The graph runs in onnxruntime (CachedAttention has a function body): that run is the
reference the compiled decode step is checked against, and calibration feeds come from it.

`build_prefill_graph` is the same network for a chunk of prompt tokens, for the compiler only:
    inputs:  input_ids int64 [1, tokens], position int64 [1] (the first token's),
             last int64 [1] (the row whose logits come out), cache_key.{i}, cache_value.{i}
    outputs: logits float32 [1, vocab]
Its linears are `actsparse.lowering.PrefillLinear` placeholders (attribute `layer`: the decode
step's node name) and its attention is `PrefillAttention` on the decode step's cache buffers;
codegen/lowering/prefill.py binds each placeholder to the weights the decode step's kernels were given,
so the two entry points share one copy of every weight.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
from onnx import TensorProto, helper, numpy_helper

from actsparse.codegen.lowering.ops import LOWERING_DOMAIN, PREFILL_ATTENTION, PREFILL_LINEAR
from actsparse.frontend.causal_lm import DecoderSpec
from actsparse.ir.custom_ops import CACHED_ATTENTION, DOMAIN, VERSION, ensure_function

OPSET = 18
PAST = "past"  # the symbolic past-length dim of the cache inputs


def cache_names(layers: int) -> list[tuple[str, str]]:
    return [(f"past_key.{i}", f"past_value.{i}") for i in range(layers)]


def present_names(layers: int) -> list[tuple[str, str]]:
    return [(f"present_key.{i}", f"present_value.{i}") for i in range(layers)]




class _Builder:
    """ONNX nodes and initializers. A prefill builder (`tokens` > 1) keeps its weights out of the
    protobuf (`shared`): they become initializers holding the same arrays, never copies."""

    def __init__(self, tokens: int = 1):
        self.tokens = tokens
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.shared: dict[str, np.ndarray] = {}
        self._constants: dict[tuple, str] = {}
        self.value_info: list[onnx.ValueInfoProto] = []
        self.cache_dtype = "float32"  # of the prefill graph's cache inputs

    @property
    def prefill(self) -> bool:
        return self.tokens > 1

    def op(self, op: str, inputs: list[str], name: str, **attrs) -> str:
        """Append one standard node named `name`; returns its output, `name.out`."""
        self.nodes.append(helper.make_node(op, inputs, [f"{name}.out"], name=name, **attrs))
        return f"{name}.out"

    def weight(self, name: str, array: np.ndarray) -> str:
        if self.prefill:
            self.shared[name] = array
        else:
            self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def const(self, value, dtype=np.float32) -> str:
        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._constants:  # prefill constants must not take the decode step's names
            name = f"{'prefill.' if self.prefill else ''}const.{len(self._constants)}"
            self.inits.append(numpy_helper.from_array(array, name))
            self._constants[key] = name
        return self._constants[key]


def build_decode_graph(spec: DecoderSpec) -> ir.Model:
    """The decode-step ONNX model of `spec` (see the module docstring)."""
    return _build(spec, _Builder())


def build_prefill_graph(spec: DecoderSpec, tokens: int, cache_capacity: int, window: int = 0,
                        cache_dtype: str = "float32") -> ir.Model:
    """The prompt-chunk model of `spec` for `tokens` tokens at a time (see the module docstring),
    its placeholders not yet bound to weights, its cache inputs [kv, head_dim, capacity] (keys)
    and [kv, capacity, head_dim] (values) as the lowered decode step has them."""
    if tokens < 2:
        raise ValueError(f"a prefill chunk has at least 2 tokens, got {tokens}")
    b = _Builder(tokens)
    b.cache_dtype = cache_dtype
    model = _build(spec, b, cache_capacity=cache_capacity, window=window)
    for name, array in b.shared.items():  # graph inputs of the protobuf -> initializers over the arrays
        value = next(v for v in model.graph.inputs if v.name == name)
        model.graph.inputs.remove(value)
        value.const_value = ir.tensor(array, name=name)
        model.graph.register_initializer(value)
    return model


def _build(spec: DecoderSpec, b: _Builder, cache_capacity: int = 0, window: int = 0) -> ir.Model:
    w = spec.weights
    x = _embed(b, spec)
    positions = "position"
    if b.prefill:
        positions = b.op("Add", ["position", b.const(np.arange(b.tokens), np.int64)], "positions")
    if spec.position_table is not None:  # OPT: learned absolute positions
        table = b.weight("positions.weight", spec.position_table)
        x = b.op("Add", [x, b.op("Gather", [table, positions], "embed/positions")], "embed/add_positions")
    rope = _rope_rows(b, spec, positions) if spec.rotary_dim else None
    for i in range(spec.layers):
        x = _layer(b, spec, x, i, rope, cache_capacity, window)
    if b.prefill:  # only the row the caller asks for goes through the norm and the head
        x = b.op("Gather", [x, "last"], "last_row")  # [1, d]
    h = _norm(b, spec, x, "norm", "norm") if "norm.weight" in w else x
    if "project_out.weight" in w:  # OPT: hidden -> word_embed_proj_dim before the head
        h = _linear(b, spec, h, "project_out", "project_out", rows=1)
    if b.prefill:
        logits = _placeholder(b, h, "lm_head", spec.vocab_size, rows=1)
    else:
        head = w["embed.weight"] if spec.tied_embeddings else w["lm_head.weight"]
        logits = b.op("MatMul", [h, b.weight("lm_head.weight_kn", head.T)], "lm_head")
    b.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="output"))
    return _model(spec, b, cache_capacity)


def _embed(b: _Builder, spec: DecoderSpec) -> str:
    """The token rows [rows, hidden]: the embedding, scaled (Gemma) or projected (OPT) where the model does."""
    w = spec.weights
    embed = b.weight("embed.weight", w["embed.weight"])
    ids = b.op("Reshape", ["input_ids", b.const([b.tokens], np.int64)], "embed/ids")
    x = b.op("Gather", [embed, ids], "embed")
    if spec.embed_scale != 1.0:
        x = b.op("Mul", [x, b.const(spec.embed_scale)], "embed/scale")
    if "project_in.weight" in w:  # OPT: word_embed_proj_dim -> hidden
        x = _linear(b, spec, x, "project_in", "project_in")
    return x


def _rope_rows(b: _Builder, spec: DecoderSpec, positions: str) -> tuple[str, str]:
    """cos, sin rows of the model's table at the tokens' positions: [1, rotary] for one token,
    [rows, 1, rotary] for a chunk (the same row for every head)."""
    cos = b.op("Gather", [b.weight("rope.cos", spec.rope_cos), positions], "rope/cos")
    sin = b.op("Gather", [b.weight("rope.sin", spec.rope_sin), positions], "rope/sin")
    if b.prefill:
        shape = b.const([b.tokens, 1, spec.rotary_dim], np.int64)
        cos = b.op("Reshape", [cos, shape], "rope/cos_rows")
        sin = b.op("Reshape", [sin, shape], "rope/sin_rows")
    return cos, sin


def _layer(b: _Builder, spec: DecoderSpec, x: str, i: int, rope, capacity: int, window: int) -> str:
    """One decoder layer on the rows x, wired as `spec.residual` says (see DecoderSpec)."""
    p = f"layers.{i}"

    def norm1(v):
        return _norm(b, spec, v, f"{p}.input_norm", f"{p}.input_layernorm")

    def norm2(v):
        return _norm(b, spec, v, f"{p}.post_attention_norm", f"{p}.post_attention_layernorm")

    def attention(h):
        return _attention(b, spec, h, i, rope, capacity, window)

    def ffn(h):
        return _ffn(b, spec, h, p)

    if spec.residual == "sequential":
        x = b.op("Add", [x, attention(norm1(x))], f"{p}/attention_residual")
        return b.op("Add", [x, ffn(norm2(x))], f"{p}/residual")
    if spec.residual == "post_norm":
        x = norm1(b.op("Add", [x, attention(x)], f"{p}/attention_residual"))
        return norm2(b.op("Add", [x, ffn(x)], f"{p}/residual"))
    if spec.residual not in ("parallel", "parallel_one_norm"):
        raise ValueError(f"residual form {spec.residual!r}")
    h = norm1(x)
    both = b.op("Add", [attention(h), ffn(h if spec.residual == "parallel_one_norm" else norm2(x))],
                f"{p}/attention_plus_ffn")
    return b.op("Add", [x, both], f"{p}/residual")


def _attention(b: _Builder, spec: DecoderSpec, h: str, i: int, rope, capacity: int, window: int) -> str:
    """o_proj(attention(q, k, v)) of the normed rows h, this token's k and v joining layer i's cache."""
    w = spec.weights
    p = f"layers.{i}"
    rows, hd, heads, kv = b.tokens, spec.head_dim, spec.heads, spec.kv_heads
    group = heads // kv
    q = _linear(b, spec, h, f"{p}.self_attn.q_proj", f"{p}.q_proj")
    k = _linear(b, spec, h, f"{p}.self_attn.k_proj", f"{p}.k_proj")
    v = _linear(b, spec, h, f"{p}.self_attn.v_proj", f"{p}.v_proj")
    lead = [rows] if b.prefill else []
    q = b.op("Reshape", [q, b.const([*lead, heads, hd], np.int64)], f"{p}.self_attn/q_heads")
    k = b.op("Reshape", [k, b.const([*lead, kv, hd], np.int64)], f"{p}.self_attn/k_heads")
    v = b.op("Reshape", [v, b.const([*lead, kv, hd] if b.prefill else [kv, 1, hd], np.int64)],
             f"{p}.self_attn/v_heads")
    if spec.qk_norm:
        q = _rms_norm(b, spec, q, w[f"{p}.q_norm.weight"], f"{p}.self_attn.q_norm")
        k = _rms_norm(b, spec, k, w[f"{p}.k_norm.weight"], f"{p}.self_attn.k_norm")
    if rope is not None:
        q = _rope(b, q, *rope, hd, spec.rotary_dim, f"{p}.self_attn/rope_q")
        k = _rope(b, k, *rope, hd, spec.rotary_dim, f"{p}.self_attn/rope_k")
    scale = spec.attention_scale if spec.attention_scale is not None else hd ** -0.5
    q = b.op("Mul", [q, b.const(scale)], f"{p}.self_attn/scale")
    name = f"{p}.self_attn/attention"
    if b.prefill:
        key, value = (f"cache_key.{i}", f"cache_value.{i}")
        b.nodes.append(helper.make_node(PREFILL_ATTENTION, [q, k, v, key, value, "position"], [f"{name}.out"],
                                        name=name, domain=LOWERING_DOMAIN, kv_heads=kv, group=group,
                                        head_dim=hd, capacity=capacity, window=window,
                                        cache_dtype=b.cache_dtype))
    else:
        q = b.op("Reshape", [q, b.const([kv, group, hd], np.int64)], f"{p}.self_attn/q_groups")
        k = b.op("Reshape", [k, b.const([kv, 1, hd], np.int64)], f"{p}.self_attn/k_groups")
        past_k, past_v = cache_names(spec.layers)[i]
        present_k, present_v = present_names(spec.layers)[i]
        b.nodes.append(helper.make_node(CACHED_ATTENTION, [q, k, v, past_k, past_v],
                                        [f"{name}.out", present_k, present_v], name=name, domain=DOMAIN))
        b.value_info += [helper.make_tensor_value_info(n, TensorProto.FLOAT, s)
                         for n, s in ((q, [kv, group, hd]), (k, [kv, 1, hd]), (v, [kv, 1, hd]),
                                      (f"{name}.out", [kv, group, hd]))]
    attn = b.op("Reshape", [f"{name}.out", b.const([rows, heads * hd], np.int64)], f"{p}.self_attn/merge")
    return _linear(b, spec, attn, f"{p}.self_attn.o_proj", f"{p}.o_proj")


def _ffn(b: _Builder, spec: DecoderSpec, h: str, p: str) -> str:
    """down(act(gate(h)) * up(h)) or down(act(up(h))): found by ir.blocks as a gated / mlp FFN."""
    if spec.gated_ffn:
        gate = _linear(b, spec, h, f"{p}.mlp.gate_proj", f"{p}.gate_proj")
        up = _linear(b, spec, h, f"{p}.mlp.up_proj", f"{p}.up_proj")
        hidden = b.op("Mul", [_activation(b, spec.activation, gate, f"{p}.mlp.act_fn"), up], f"{p}.mlp/Mul")
    else:
        up = _linear(b, spec, h, f"{p}.mlp.up_proj", f"{p}.up_proj")
        hidden = _activation(b, spec.activation, up, f"{p}.mlp.act_fn")
    return _linear(b, spec, hidden, f"{p}.mlp.down_proj", f"{p}.down_proj")


def _model(spec: DecoderSpec, b: _Builder, capacity: int) -> ir.Model:
    kv, hd = spec.kv_heads, spec.head_dim
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, b.tokens]),
              helper.make_tensor_value_info("position", TensorProto.INT64, [1])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, spec.vocab_size])]
    if b.prefill:
        inputs.append(helper.make_tensor_value_info("last", TensorProto.INT64, [1]))
        element = TensorProto.FLOAT16 if b.cache_dtype == "float16" else TensorProto.FLOAT
        for i in range(spec.layers):
            inputs += [helper.make_tensor_value_info(f"cache_key.{i}", element, [kv, hd, capacity]),
                       helper.make_tensor_value_info(f"cache_value.{i}", element, [kv, capacity, hd])]
        inputs += [helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(array.dtype), array.shape)
                   for name, array in b.shared.items()]
    else:
        for (pk, pv), (nk, nv) in zip(cache_names(spec.layers), present_names(spec.layers)):
            inputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, [kv, PAST, hd]) for n in (pk, pv)]
            outputs += [helper.make_tensor_value_info(n, TensorProto.FLOAT, [kv, "present", hd]) for n in (nk, nv)]
    kind = "prefill" if b.prefill else "decode_step"
    graph = helper.make_graph(b.nodes, f"{spec.family}_{kind}", inputs, outputs, initializer=b.inits,
                              value_info=b.value_info)
    opsets = [helper.make_opsetid("", OPSET), helper.make_opsetid(DOMAIN, VERSION)]
    if b.prefill:
        opsets.append(helper.make_opsetid(LOWERING_DOMAIN, 1))
    proto = helper.make_model(graph, opset_imports=opsets)
    proto.ir_version = 9
    model = ir.serde.deserialize_model(proto)
    if not b.prefill:
        ensure_function(model, CACHED_ATTENTION)
    return model


def _placeholder(b: _Builder, x: str, layer: str, n: int, rows: int | None = None) -> str:
    """A prefill linear of x [rows, k], bound later to the decode step's weights for `layer`."""
    b.nodes.append(helper.make_node(PREFILL_LINEAR, [x], [f"{layer}.out"], name=layer, domain=LOWERING_DOMAIN,
                                    layer=layer, n=n, rows=rows or b.tokens))
    return f"{layer}.out"


def _linear(b: _Builder, spec: DecoderSpec, x: str, node_name: str, key: str, rows: int | None = None) -> str:
    if b.prefill:
        y = _placeholder(b, x, node_name, spec.weights[f"{key}.weight"].shape[0], rows)
    else:
        y = b.op("MatMul", [x, b.weight(f"{key}.weight_kn", spec.weights[f"{key}.weight"].T)], node_name)
    bias = spec.weights.get(f"{key}.bias")
    if bias is not None:
        y = b.op("Add", [y, b.weight(f"{key}.bias", bias)], f"{node_name}/bias")
    return y


def _norm(b: _Builder, spec: DecoderSpec, x: str, key: str, name: str) -> str:
    """The model's norm (RMSNorm, or LayerNorm with its shift) of x over the last axis; its
    parameters are `key`.weight / `key`.bias of the spec."""
    weight = spec.weights[f"{key}.weight"]
    if spec.norm == "rms":
        return _rms_norm(b, spec, x, weight, name)
    shift = spec.weights.get(f"{key}.bias", np.zeros_like(weight))
    return b.op("LayerNormalization", [x, b.weight(f"{name}.weight", weight), b.weight(f"{name}.bias", shift)],
                name, axis=-1, epsilon=spec.norm_eps)


def _rms_norm(b: _Builder, spec: DecoderSpec, x: str, weight: np.ndarray, name: str) -> str:
    """x / sqrt(mean(x^2) + eps) * (offset + w) over the last axis."""
    square = b.op("Mul", [x, x], f"{name}/square")
    mean = b.op("ReduceMean", [square, b.const([-1], np.int64)], f"{name}/mean", keepdims=1)
    rms = b.op("Sqrt", [b.op("Add", [mean, b.const(spec.norm_eps)], f"{name}/eps")], f"{name}/sqrt")
    normed = b.op("Div", [x, rms], f"{name}/div")
    scale = (weight + spec.norm_offset).astype(np.float32)
    return b.op("Mul", [normed, b.weight(f"{name}.weight", scale)], f"{name}/weight")


def _rope(b: _Builder, x: str, cos: str, sin: str, hd: int, rotary: int, name: str) -> str:
    """x * cos + rotate_half(x) * sin on the first `rotary` dims of each head, the rest passed
    through (partial rotary: GPT-NeoX's rotary_pct, partial_rotary_factor); the Llama / NeoX
    convention rotate_half(x) = [-x2, x1] applies to that slice."""
    def dims(value: str, start: int, stop: int, suffix: str) -> str:
        return b.op("Slice", [value, b.const([start], np.int64), b.const([stop], np.int64), b.const([-1], np.int64)],
                    f"{name}/{suffix}")

    part = x if rotary == hd else dims(x, 0, rotary, "rotary")
    x1, x2 = dims(part, 0, rotary // 2, "x1"), dims(part, rotary // 2, rotary, "x2")
    rotated = b.op("Concat", [b.op("Neg", [x2], f"{name}/neg"), x1], f"{name}/rotate", axis=-1)
    out = b.op("Add", [b.op("Mul", [part, cos], f"{name}/cos"), b.op("Mul", [rotated, sin], f"{name}/sin")],
               f"{name}/add")
    if rotary == hd:
        return out
    return b.op("Concat", [out, dims(x, rotary, hd, "pass")], f"{name}/with_pass", axis=-1)


def _activation(b: _Builder, kind: str, x: str, name: str) -> str:
    if kind == "silu":
        return b.op("Mul", [x, b.op("Sigmoid", [x], f"{name}/Sigmoid")], f"{name}/Mul")
    if kind == "relu":
        return b.op("Relu", [x], f"{name}/Relu")
    if kind == "relu2":  # relufy{act=relu2}
        relu = b.op("Relu", [x], f"{name}/Relu")
        return b.op("Mul", [relu, relu], f"{name}/Square")
    if kind.startswith("shifted_relu:"):  # relufy{act=shifted_relu,shift=b}: Relu(x - b)
        shift = float(kind.split(":", 1)[1])
        return b.op("Relu", [b.op("Sub", [x, b.const(shift)], f"{name}/Shift")], f"{name}/Relu")
    if kind == "gelu":
        erf = b.op("Erf", [b.op("Div", [x, b.const(np.sqrt(2.0))], f"{name}/Div")], f"{name}/Erf")
        half = b.op("Mul", [b.op("Add", [erf, b.const(1.0)], f"{name}/Add"), b.const(0.5)], f"{name}/Half")
        return b.op("Mul", [x, half], f"{name}/Mul")
    if kind == "gelu_tanh":
        cube = b.op("Mul", [b.op("Mul", [x, x], f"{name}/sq"), x], f"{name}/cube")
        inner = b.op("Add", [x, b.op("Mul", [cube, b.const(0.044715)], f"{name}/c")], f"{name}/inner")
        tanh = b.op("Tanh", [b.op("Mul", [inner, b.const(np.sqrt(2.0 / np.pi))], f"{name}/k")], f"{name}/Tanh")
        half = b.op("Mul", [b.op("Add", [tanh, b.const(1.0)], f"{name}/Add"), b.const(0.5)], f"{name}/Half")
        return b.op("Mul", [x, half], f"{name}/Mul")
    raise ValueError(f"activation {kind!r}")
