"""Find the linear layers, feed-forward blocks and attention blocks of an ONNX model.

Works on graphs from torch's dynamo exporter (MatMul with a pre-transposed weight, or
Gemm; module paths in the node metadata `pkg.torch.onnx.name_scopes`), from the older
TorchScript exporter (names like `/encoder/layer.0/intermediate/dense/MatMul`, biases
behind Identity nodes, GELU as an Erf decomposition) and from hand-written graphs.

- A *linear* is a MatMul or Gemm whose second operand is a constant 2-D weight, maybe
  behind Transpose / Cast / Identity nodes, plus the bias Add that follows a MatMul.
- An *FFN block* is `down(act(up(x)))` ("mlp", BERT / GPT-2) or
  `down(act(gate(x)) * up(x))` ("gated", SwiGLU / GeGLU as in Llama); shape-only ops
  (Reshape, Squeeze, ...) may sit between the pieces.
- An *attention block* is anchored on a Softmax: the projections reached backwards from
  its scores MatMul are q and k, the one feeding the probabilities' MatMul is v, the
  first linear after that is o. GPT-2's single c_attn projection is q, k and v at once.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from actsparse.ir.activations import Activation, match_activation
from actsparse.ir.custom_ops import is_cached_attention, is_predict_active, is_sparsify
from actsparse.ir.graph import dataflow_graph, nearest_downstream, nearest_upstream

__all__ = [
    "Linear", "FFNBlock", "AttentionBlock", "Blocks", "find_linears", "find_blocks", "predicted_mask_input",
]

# Ops that only move or relabel data: walked through between a block's pieces.
_SHAPE_ONLY = frozenset({"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity"})
# Ops allowed between a weight initializer and the MatMul/Gemm that reads it.
_WEIGHT_CHAIN = frozenset({"Transpose", "Cast", "Identity"})
_SCOPES_KEY = "pkg.torch.onnx.name_scopes"


@dataclass(eq=False)
class Linear:
    """`output = input @ W (+ bias)`, one MatMul or Gemm with a constant weight.

    weight: the constant value (initializer or Constant output) at the start of the
    weight chain; `weight_nodes` are the Transpose/Cast/Identity nodes between it and
    `node`. weight_layout: "KN" when the stored tensor is [in, out] (y = x @ W),
    "NK" when it is [out, in] (Gemm transB=1, or MatMul after a Transpose).
    output: the value after the bias, i.e. `bias_node`'s output when a MatMul is
    followed by a bias Add, else `node`'s output. module: the torch module path
    ("encoder.layer.0.intermediate.dense") when the graph records one, else None.
    """

    node: ir.Node
    input: ir.Value
    weight: ir.Value
    weight_layout: str
    in_features: int
    out_features: int
    bias: ir.Value | None
    output: ir.Value
    bias_node: ir.Node | None = None
    weight_nodes: tuple[ir.Node, ...] = ()
    module: str | None = None

    @property
    def name(self) -> str:
        """The MatMul/Gemm node's name."""
        return self.node.name or ""

    @property
    def weight_shared(self) -> bool:
        """Whether other nodes read the same weight tensor (tied embeddings, merged initializers):
        a pass must then copy it before changing it."""
        reader = self.weight_nodes[0] if self.weight_nodes else self.node
        return any(use.node is not reader for use in self.weight.uses())

    @property
    def plain_product(self) -> bool:
        """x @ W with the activation on the left: a MatMul, or a Gemm without transA, alpha or beta."""
        if self.node.inputs[0] is not self.input:
            return False
        if self.node.op_type == "Gemm":
            attrs = self.node.attributes
            return not (attrs.get_int("transA", 0) or attrs.get_float("alpha", 1.0) != 1.0
                        or attrs.get_float("beta", 1.0) != 1.0)
        return self.node.op_type == "MatMul"

    def weight_array(self, layout: str = "KN") -> np.ndarray:
        """The weight as a numpy array in `layout` ("KN": [in, out], or "NK": [out, in])."""
        if layout not in ("KN", "NK"):
            raise ValueError(f"layout must be 'KN' or 'NK', not {layout!r}")
        array = ir.convenience.get_const_tensor(self.weight).numpy()
        return array if layout == self.weight_layout else array.T

    def bias_array(self) -> np.ndarray | None:
        """The bias as a 1-D numpy array of length out_features, or None."""
        if self.bias is None:
            return None
        return _constant(self.bias).numpy().reshape(-1)


@dataclass(eq=False)
class FFNBlock:
    """A feed-forward block. kind "mlp": down(act(up(x))); kind "gated": down(act(gate(x)) * up(x)).

    hidden: the value the down projection reads (`down.input`), whose zeros are the
    activation sparsity that actsparse exploits.
    """

    name: str
    kind: str
    up: Linear
    gate: Linear | None
    down: Linear
    activation: Activation
    hidden: ir.Value

    @property
    def linears(self) -> list[Linear]:
        return [lin for lin in (self.gate, self.up, self.down) if lin is not None]


@dataclass(eq=False)
class AttentionBlock:
    """Self-attention around one Softmax (or one actsparse.CachedAttention node of a decode step,
    held in `softmax`). q, k, v are the same Linear when `fused_qkv`."""

    name: str
    q: Linear
    k: Linear
    v: Linear
    o: Linear | None
    softmax: ir.Node
    fused_qkv: bool = False


@dataclass(eq=False)
class Blocks:
    """All linears (graph order), FFN blocks and attention blocks of a model."""

    linears: list[Linear] = field(default_factory=list)
    ffn: list[FFNBlock] = field(default_factory=list)
    attention: list[AttentionBlock] = field(default_factory=list)

    def get(self, name: str) -> FFNBlock | AttentionBlock:
        """The block called `name`; KeyError if there is none."""
        for block in (*self.ffn, *self.attention):
            if block.name == name:
                return block
        raise KeyError(name)


# ---------------------------------------------------------------------------- linears

def find_linears(model: ir.Model | ir.Graph) -> list[Linear]:
    """Every MatMul/Gemm of the top-level graph whose weight is a constant 2-D tensor, in graph order."""
    graph = model.graph if isinstance(model, ir.Model) else model
    linears = []
    for node in graph:
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type == "MatMul":
            linear = _matmul_linear(node)
        elif node.op_type == "Gemm":
            linear = _gemm_linear(node)
        else:
            continue
        if linear is not None:
            linears.append(linear)
    return linears


def _constant(value: ir.Value | None):
    """The constant tensor of `value` (through Identity nodes), or None; graph inputs are not constant."""
    while value is not None and not value.is_graph_input():
        try:
            tensor = ir.convenience.get_const_tensor(value)
        except ValueError:
            return None
        if tensor is not None:
            return tensor
        producer = value.producer()
        if producer is None or producer.op_type != "Identity":
            return None
        value = producer.inputs[0]
    return None


def _weight_source(value: ir.Value) -> tuple[ir.Value, tuple[ir.Node, ...], bool] | None:
    """Walk a weight operand back to its constant: (constant value, chain nodes, transposed?)."""
    chain: list[ir.Node] = []
    transposed = False
    while True:
        if value.is_graph_input():
            return None
        try:
            if ir.convenience.get_const_tensor(value) is not None:
                return value, tuple(reversed(chain)), transposed
        except ValueError:
            return None
        producer = value.producer()
        if producer is None or producer.op_type not in _WEIGHT_CHAIN:
            return None
        if producer.op_type == "Transpose":
            perm = producer.attributes.get("perm")
            if perm is not None and list(perm.value) != [1, 0]:
                return None
            transposed = not transposed
        chain.append(producer)
        value = producer.inputs[0]


def _weight_shape(value: ir.Value) -> tuple[int, int] | None:
    tensor = ir.convenience.get_const_tensor(value)
    dims = tensor.shape.dims
    if len(dims) != 2 or not all(isinstance(d, int) for d in dims):
        return None
    return dims[0], dims[1]


def _matmul_linear(node: ir.Node) -> Linear | None:
    if len(node.inputs) != 2 or node.inputs[0] is None or node.inputs[1] is None:
        return None
    if _constant(node.inputs[0]) is not None:
        return None  # constant @ constant, or a weight on the left: not a layer over activations
    source = _weight_source(node.inputs[1])
    if source is None:
        return None
    weight, chain, transposed = source
    shape = _weight_shape(weight)
    if shape is None:
        return None
    layout = "NK" if transposed else "KN"
    k, n = shape if layout == "KN" else shape[::-1]
    bias, bias_node = _following_bias(node.outputs[0], n)
    output = bias_node.outputs[0] if bias_node is not None else node.outputs[0]
    return Linear(node, node.inputs[0], weight, layout, k, n, bias, output, bias_node, chain,
                  _module_path(node, bias_node))


def _gemm_linear(node: ir.Node) -> Linear | None:
    attr = {name: a.value for name, a in node.attributes.items()}
    if attr.get("transA", 0) != 0 or attr.get("alpha", 1.0) != 1.0:
        return None
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    if bias is not None and attr.get("beta", 1.0) != 1.0:
        return None
    if node.inputs[0] is None or node.inputs[1] is None or _constant(node.inputs[0]) is not None:
        return None
    source = _weight_source(node.inputs[1])
    if source is None:
        return None
    weight, chain, transposed = source
    shape = _weight_shape(weight)
    if shape is None:
        return None
    layout = "NK" if transposed != bool(attr.get("transB", 0)) else "KN"
    k, n = shape if layout == "KN" else shape[::-1]
    if bias is not None and _constant(bias) is None:
        return None  # a bias computed at run time: not a plain linear layer
    return Linear(node, node.inputs[0], weight, layout, k, n, bias, node.outputs[0], None, chain,
                  _module_path(node, None))


def _following_bias(value: ir.Value, out_features: int) -> tuple[ir.Value | None, ir.Node | None]:
    """The bias of `Add(value, b)` when that Add is `value`'s only use and b is a constant [.., N]."""
    uses = value.uses()
    if len(uses) != 1 or value.is_graph_output():
        return None, None
    add = uses[0].node
    if add.op_type != "Add" or len(add.inputs) != 2:
        return None, None
    other = add.inputs[1 - uses[0].idx]
    tensor = _constant(other)
    if tensor is None:
        return None, None
    dims = tensor.shape.dims
    if not dims or dims[-1] != out_features or any(d != 1 for d in dims[:-1]):
        return None, None
    return other, add


def _module_path(node: ir.Node, bias_node: ir.Node | None) -> str | None:
    """The torch module a linear came from, from exporter metadata or a scoped node name."""
    for candidate in (node, bias_node):
        if candidate is None:
            continue
        scopes = candidate.metadata_props.get(_SCOPES_KEY)
        if scopes:
            try:
                names = ast.literal_eval(scopes)
            except (ValueError, SyntaxError):
                names = []
            # The last entry names the op itself ("linear"); the one before is the module.
            if len(names) >= 2 and names[-2]:
                return names[-2]
    name = node.name or ""
    if "/" in name:  # TorchScript: /encoder/layer.0/intermediate/dense/MatMul
        parts = [p for p in name.split("/") if p][:-1]
        return ".".join(parts) or None
    if "." in name:  # hand-written graphs named after modules
        return name
    return None


# ------------------------------------------------------------------------------ blocks

def find_blocks(model: ir.Model) -> Blocks:
    """Find the linears, FFN blocks and attention blocks of `model`, each list in graph order."""
    linears = find_linears(model)
    by_output = {lin.output: lin for lin in linears}
    by_node: dict[ir.Node, Linear] = {}
    for lin in linears:
        by_node[lin.node] = lin
        if lin.bias_node is not None:
            by_node[lin.bias_node] = lin
    ffn = _find_ffn_blocks(linears, by_output)
    attention = _find_attention_blocks(model.graph, by_node)
    _name_blocks(ffn, "ffn", "mlp", lambda b: b.linears)
    _name_blocks(attention, "attention", "attention",
                 lambda b: list({id(x): x for x in (b.q, b.k, b.v, b.o) if x is not None}.values()))
    return Blocks(linears, ffn, attention)


def _skip_shape_ops_back(value: ir.Value) -> ir.Value:
    """Walk back through Reshape/Squeeze/..., actsparse.Sparsify* and a predictor's mask multiply
    `Mul(h, actsparse.PredictActive*(x))` (both only zero entries) to the value that carries the data."""
    for _ in range(16):
        producer = value.producer()
        if producer is None or not producer.inputs:
            break
        masked = predicted_mask_input(producer)
        if masked is not None:
            value = masked
            continue
        sparsify = is_sparsify(producer)
        if producer.op_type not in _SHAPE_ONLY and not sparsify:
            break
        value = producer.inputs[0]
    return value


def predicted_mask_input(node: ir.Node) -> ir.Value | None:
    """h when `node` is Mul(h, m) or Mul(m, h) with m from an actsparse.PredictActive* op, else None."""
    if node.op_type != "Mul" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
        return None
    for index, value in enumerate(node.inputs):
        producer = value.producer() if value is not None else None
        if producer is not None and is_predict_active(producer):
            return node.inputs[1 - index]
    return None


def _linear_producing(value: ir.Value, by_output: dict[ir.Value, Linear]) -> Linear | None:
    return by_output.get(_skip_shape_ops_back(value))


def _find_ffn_blocks(linears: list[Linear], by_output: dict[ir.Value, Linear]) -> list[FFNBlock]:
    blocks = []
    used: set[Linear] = set()
    for down in linears:
        block = _ffn_ending_in(down, by_output)
        if block is None or any(lin in used for lin in block.linears):
            continue
        used.update(block.linears)
        blocks.append(block)
    return blocks


def _ffn_ending_in(down: Linear, by_output: dict[ir.Value, Linear]) -> FFNBlock | None:
    source = _skip_shape_ops_back(down.input)
    producer = source.producer()
    if producer is not None and producer.op_type == "Mul" and len(producer.inputs) == 2:
        gated = _gated_ffn(down, producer, by_output)
        if gated is not None:
            return gated
    activation = match_activation(source)
    if activation is None:
        return None
    up = _linear_producing(activation.input, by_output)
    if up is None or up is down or up.out_features != down.in_features:
        return None
    return FFNBlock("", "mlp", up, None, down, activation, down.input)


def _gated_ffn(down: Linear, mul: ir.Node, by_output: dict[ir.Value, Linear]) -> FFNBlock | None:
    a, b = mul.inputs
    if a is None or b is None:
        return None
    for act_side, up_side in ((a, b), (b, a)):
        activation = match_activation(_skip_shape_ops_back(act_side))
        if activation is None:
            continue
        gate = _linear_producing(activation.input, by_output)
        up = _linear_producing(up_side, by_output)
        if gate is None or up is None or gate is up or down in (gate, up):
            continue
        same_input = _skip_shape_ops_back(gate.input) is _skip_shape_ops_back(up.input)
        if same_input and gate.out_features == up.out_features == down.in_features:
            return FFNBlock("", "gated", up, gate, down, activation, down.input)
    return None


def _find_attention_blocks(graph: ir.Graph, by_node: dict[ir.Node, Linear]) -> list[AttentionBlock]:
    dag = dataflow_graph(graph)
    linear_nodes = set(by_node)
    blocks = []
    seen: set[tuple[int, int, int]] = set()
    for softmax in graph:
        if is_cached_attention(softmax):  # a decode step's attention over the KV cache: q, k, v are its inputs
            block = _cached_attention_block(softmax, dag, by_node, linear_nodes)
        elif softmax.op_type != "Softmax":
            continue
        else:
            block = _attention_around(softmax, dag, by_node, linear_nodes)
        if block is None:
            continue
        key = (id(block.q), id(block.k), id(block.v))
        if key not in seen:
            seen.add(key)
            blocks.append(block)
    return blocks


def _unique_linear(nodes: set[ir.Node], by_node: dict[ir.Node, Linear]) -> Linear | None:
    found = {id(by_node[n]): by_node[n] for n in nodes}
    return next(iter(found.values())) if len(found) == 1 else None


def _attention_around(softmax, dag, by_node, linear_nodes) -> AttentionBlock | None:
    scores = _first_matmul(softmax, dag, upstream=True, linear_nodes=linear_nodes)
    probs = _first_matmul(softmax, dag, upstream=False, linear_nodes=linear_nodes)
    if scores is None or probs is None:
        return None
    q = _unique_linear(nearest_upstream(dag, scores.inputs[0], linear_nodes), by_node)
    k = _unique_linear(nearest_upstream(dag, scores.inputs[1], linear_nodes), by_node)
    v = _unique_linear(nearest_upstream(dag, probs.inputs[1], linear_nodes), by_node)
    if q is None or k is None or v is None:
        return None
    o = _unique_linear(nearest_downstream(dag, probs, linear_nodes), by_node)
    fused = q is k or k is v or q is v
    return AttentionBlock("", q, k, v, o, softmax, fused)


def _cached_attention_block(node, dag, by_node, linear_nodes) -> AttentionBlock | None:
    q, k, v = (_unique_linear(nearest_upstream(dag, value, linear_nodes), by_node) for value in node.inputs[:3])
    if q is None or k is None or v is None:
        return None
    o = _unique_linear(nearest_downstream(dag, node, linear_nodes), by_node)
    return AttentionBlock("", q, k, v, o, node, q is k or k is v or q is v)


def _first_matmul(softmax: ir.Node, dag, *, upstream: bool, linear_nodes: set[ir.Node]) -> ir.Node | None:
    """The activation x activation MatMul nearest to `softmax` (scores before it, probs @ V after)."""
    step = dag.predecessors if upstream else dag.successors
    frontier, seen = [softmax], {softmax}
    while frontier and len(seen) < 16:
        node = frontier.pop(0)
        for other in step(node):
            if other in seen or other in linear_nodes:
                continue
            seen.add(other)
            if other.op_type == "MatMul":
                if upstream or other.inputs[0] is not None and _reaches_input0(node, other):
                    return other
                continue
            frontier.append(other)
    return None


def _reaches_input0(node: ir.Node, matmul: ir.Node) -> bool:
    """Whether `node`'s output is the first operand of `matmul` (probabilities, not V)."""
    return matmul.inputs[0].producer() is node


# ------------------------------------------------------------------------------ names

def _name_blocks(blocks, fallback: str, suffix: str, linears_of) -> None:
    """Name each block after the module path its linears share ("layers.0.mlp"), else by order."""
    taken: set[str] = set()
    for index, block in enumerate(blocks):
        paths = [lin.module for lin in linears_of(block)]
        name = _common_module(paths) if all(paths) else ""
        if name and name.split(".")[-1].isdigit():
            name = f"{name}.{suffix}"  # the layer itself: say which part of it
        if not name or name in taken:
            name = f"{fallback}.{index}"
        taken.add(name)
        block.name = name


def _common_module(paths: list[str]) -> str:
    split = [p.split(".") for p in paths]
    common = []
    for parts in zip(*split):
        if len(set(parts)) != 1:
            break
        common.append(parts[0])
    if len(paths) == 1:
        common = split[0][:-1]
    return ".".join(common)

