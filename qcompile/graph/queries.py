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
