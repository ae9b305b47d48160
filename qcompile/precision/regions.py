"""The layer graph (networkx) that keeps float layers in contiguous regions.

Nodes are the searchable layers (Conv, Gemm, MatMul); an edge A -> B means B reads A's output
through ops that are not layers themselves (Relu, Add, Reshape, Softmax, ...). A set of float
layers is then a subgraph; its weakly connected components are the float regions. Every region
costs a boundary: a DequantizeLinear in and a QuantizeLinear out, and onnxruntime switching
kernels. So the search prefers promotions that grow or join regions, fills int8 islands left between
float layers, and never demotes a layer out of the middle of a region.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

import networkx as nx
import onnx_ir as ir


def layer_graph(model: ir.Model, layers: Collection[str]) -> nx.DiGraph:
    graph = nx.DiGraph()
    graph.add_nodes_from(layers)
    by_name = {node.name: node for node in model.graph}
    for name in layers:
        seen: set[int] = set()
        stack = [use.node for out in by_name[name].outputs for use in out.uses()]
        while stack:
            node = stack.pop()
            if id(node) in seen:
                continue
            seen.add(id(node))
            if node.name in graph and node.name != name:
                graph.add_edge(name, node.name)
                continue
            stack += [use.node for out in node.outputs for use in out.uses()]
    return graph


def regions(graph: nx.DiGraph, float_layers: Iterable[str]) -> int:
    """How many contiguous float regions ``float_layers`` form."""
    return nx.number_weakly_connected_components(graph.subgraph(set(float_layers))) if float_layers else 0


def islands(graph: nx.DiGraph, float_layers: Collection[str]) -> list[str]:
    """int8 layers whose every neighbour (at least two) is float: they would bounce int8 -> float -> int8."""
    out = []
    for name in graph.nodes:
        if name in float_layers:
            continue
        neighbours = set(graph.predecessors(name)) | set(graph.successors(name))
        if len(neighbours) >= 2 and neighbours <= set(float_layers):
            out.append(name)
    return out
