"""Read-only questions about an onnx_ir graph."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx_ir as ir


def constant_array(value: ir.Value | None) -> np.ndarray | None:
    """The value's data if it is a constant (initializer or Constant node output), else None.

    A graph input that is also an initializer can be overridden at run time, so it is not constant.
    """
    if value is None:
        return None
    if value.is_graph_input():
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and producer.domain in ("", "ai.onnx"):
        attr = producer.attributes.get("value")
        if attr is not None and isinstance(attr.value, ir.TensorProtocol):
            return attr.value.numpy()
    return None


def is_float(value: ir.Value | None) -> bool:
    return value is not None and value.dtype in (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE)


def op_counts(model: ir.Model) -> Counter:
    return Counter(node.op_type for node in model.graph.all_nodes())


def node_count(model: ir.Model) -> int:
    return sum(1 for _ in model.graph.all_nodes())


def opset_version(model: ir.Model) -> int:
    return int(model.opset_imports.get("", model.opset_imports.get("ai.onnx", 0)))


# Ops that move elements without changing them: a per-tensor scale or quantization commutes with each.
ELEMENT_MOVEMENT = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity"})


def is_op(node: ir.Node | None, op_type: str) -> bool:
    """Whether ``node`` is the standard-domain ``op_type``."""
    return node is not None and node.op_type == op_type and node.domain in ("", "ai.onnx")


def sole_reader(value: ir.Value) -> ir.Node | None:
    """The one node reading ``value`` (once), or None: no reader, several, or a graph output."""
    uses = value.uses()
    if value.is_graph_output() or len(uses) != 1:
        return None
    return uses[0].node


def chain_to_quantize(value: ir.Value, max_nodes: int | None = None) -> list[ir.Node] | None:
    """``[movement ops..., QuantizeLinear]`` when ``value``'s only path is element movement into a
    QuantizeLinear (each node the sole reader, at its data input), at most ``max_nodes`` long; else None."""
    chain: list[ir.Node] = []
    while max_nodes is None or len(chain) < max_nodes:
        reader = sole_reader(value)
        if reader is None or reader.domain not in ("", "ai.onnx") or reader.inputs[0] is not value:
            return None
        chain.append(reader)
        if reader.op_type == "QuantizeLinear":
            return chain
        if reader.op_type not in ELEMENT_MOVEMENT or len(reader.outputs) != 1:
            return None
        value = reader.outputs[0]
    return None
