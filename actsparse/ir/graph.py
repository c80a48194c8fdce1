"""Graph algorithms over an `ir.Graph`'s dataflow, with networkx.

The networkx graph is a view for reachability questions only; the IR stays `onnx_ir`.
Edges that carry shapes rather than data (the shape operand of Reshape, anything out
of Shape, the condition of Where, ...) are left out, so that "which projections feed
this Softmax" is not answered through a `Shape(x)` side path.
"""

from __future__ import annotations

import networkx as nx
import onnx_ir as ir

__all__ = ["dataflow_graph", "data_inputs", "nearest_upstream", "nearest_downstream"]

# Ops whose only data operand is input 0; the others are shapes, indices or axes.
_FIRST_INPUT_ONLY = frozenset({
    "Reshape", "Expand", "Tile", "Slice", "Squeeze", "Unsqueeze", "Pad", "Resize",
    "Gather", "GatherElements", "GatherND", "Split", "ReduceMean", "ReduceSum", "ReduceMax",
    "ReduceMin", "TopK", "CumSum", "Dropout", "Trilu",
})
# Ops whose outputs describe shapes or positions, never activations.
_SHAPE_OPS = frozenset({"Shape", "Size", "ConstantOfShape", "Range", "EyeLike", "Constant"})


def data_inputs(node: ir.Node) -> list[tuple[int, ir.Value]]:
    """(index, value) of the inputs of `node` that carry data (not shapes, axes or conditions)."""
    if node.op_type in _SHAPE_OPS:
        return []
    pairs = [(i, v) for i, v in enumerate(node.inputs) if v is not None]
    if node.op_type in _FIRST_INPUT_ONLY:
        return pairs[:1] if pairs and pairs[0][0] == 0 else []
    if node.op_type == "Where":
        return [(i, v) for i, v in pairs if i != 0]
    return pairs


def dataflow_graph(graph: ir.Graph) -> nx.DiGraph:
    """A DiGraph of the nodes of `graph` (top level) with an edge producer -> consumer per data input.

    Each edge has the attribute `inputs`: the set of input indices of the consumer it feeds.
    """
    dag = nx.DiGraph()
    dag.add_nodes_from(graph)
    for node in graph:
        for index, value in data_inputs(node):
            producer = value.producer()
            if producer is None or producer not in dag:
                continue
            if dag.has_edge(producer, node):
                dag[producer][node]["inputs"].add(index)
            else:
                dag.add_edge(producer, node, inputs={index})
    return dag


def nearest_upstream(
    dag: nx.DiGraph, start: ir.Node | ir.Value, targets: set[ir.Node], *, limit: int = 256
) -> set[ir.Node]:
    """Target nodes reachable backwards from `start` without passing through another target.

    From a value, the search starts at its producer (which is the answer if it is a
    target); from a node, the node itself is never a result. At most `limit` nodes are
    visited, so an unexpected graph costs little and finds nothing rather than the model.
    """
    if isinstance(start, ir.Value):
        producer = start.producer()
        if producer is None or producer not in dag:
            return set()
        if producer in targets:
            return {producer}
        start = producer
    return _nearest(dag.predecessors, start, targets, limit)


def nearest_downstream(dag: nx.DiGraph, start: ir.Node, targets: set[ir.Node], *, limit: int = 256) -> set[ir.Node]:
    """Target nodes reachable forwards from `start` without passing through another target."""
    return _nearest(dag.successors, start, targets, limit)


def _nearest(neighbours, start: ir.Node, targets: set[ir.Node], limit: int) -> set[ir.Node]:
    found: set[ir.Node] = set()
    seen = {start}
    frontier: list[ir.Node] = [start]
    while frontier and len(seen) <= limit:
        node = frontier.pop(0)
        for neighbour in neighbours(node):
            if neighbour in seen:
                continue
            seen.add(neighbour)
            if neighbour in targets:
                found.add(neighbour)
            else:
                frontier.append(neighbour)
    return found



def name_unnamed_nodes(model: ir.Model) -> int:
    """Give every node without a name (valid ONNX) a unique, stable one: `{op_type}_{n}` in graph
    order, skipping names already taken. Passes key layers and reports by node name, so two
    unnamed linears must not share the empty name. Returns how many nodes were named."""
    taken = {node.name for node in model.graph if node.name}
    count = 0
    for index, node in enumerate(model.graph):
        if node.name:
            continue
        name, suffix = f"{node.op_type}_{index}", 1
        while name in taken:
            name, suffix = f"{node.op_type}_{index}_{suffix}", suffix + 1
        node.name = name
        taken.add(name)
        count += 1
    return count
