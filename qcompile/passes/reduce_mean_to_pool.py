"""ReduceMeanToGlobalPoolPass: ReduceMean over every spatial axis, keeping dims → GlobalAveragePool.

Exporters write ``AdaptiveAvgPool2d(1)`` / ``x.mean((2, 3), keepdim=True)`` as
``ReduceMean(x, axes=[2, 3] or [-2, -1], keepdims=1)``. GlobalAveragePool computes the same
numbers (the mean over all axes after the channel axis, ONNX Operators GlobalAveragePool-1) and has
an int8 kernel in onnxruntime (QLinearGlobalAveragePool), which ReduceMean does not; rewriting it
keeps a CNN's head in int8.

Preconditions: the input rank is known (shape inference) and ≥ 3; the axes are constant (the
``axes`` input from opset 18, the attribute before); ``keepdims`` is 1 (the default);
``noop_with_empty_axes`` is 0.
"""

from __future__ import annotations

import onnx_ir as ir

from qcompile.graph.queries import constant_array


def _axes(node: ir.Node) -> list[int] | None:
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        data = constant_array(node.inputs[1])
        return None if data is None else [int(a) for a in data.reshape(-1)]
    attr = node.attributes.get("axes")
    return None if attr is None else [int(a) for a in attr.value]


class ReduceMeanToGlobalPoolPass(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        graph = model.graph
        for node in list(graph):
            if node.op_type != "ReduceMean" or node.domain not in ("", "ai.onnx"):
                continue
            data = node.inputs[0]
            if data is None or data.shape is None or len(data.shape) < 3:
                continue
            keepdims = node.attributes.get("keepdims")
            noop = node.attributes.get("noop_with_empty_axes")
            if (keepdims is not None and keepdims.value != 1) or (noop is not None and noop.value != 0):
                continue
            axes = _axes(node)
            rank = len(data.shape)
            if axes is None or sorted(a % rank for a in axes) != list(range(2, rank)):
                continue
            pool = ir.node("GlobalAveragePool", [data], name=node.name)
            graph.insert_before(node, pool)
            out = node.outputs[0]
            pool.outputs[0].dtype, pool.outputs[0].shape = out.dtype, out.shape
            out.replace_all_uses_with(pool.outputs[0], replace_graph_outputs=True)
            name = out.name
            graph.remove(node, safe=True)
            pool.outputs[0].name = name  # keeps a graph output's name
            modified = True
        return ir.passes.PassResult(model, modified=modified)
