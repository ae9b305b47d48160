"""ClearIntermediateShapesPass: the output model carries no type or shape for intermediate values.

The passes need the types and shapes that shape inference attached to every intermediate value
(ranks, dtypes); the output file does not: onnxruntime infers what it needs when it loads the model.
Written out as ``value_info``, they also tell onnxruntime shapes it cannot infer itself (behind a
Reshape whose target is computed, as exporters write attention), and with those its CPU graph
optimizer fuses a residual Add and the LayerNormalization after it into SkipLayerNormalization,
whose kernel measured slower than the two ops it replaces (onnxruntime 1.32, MiniLM at 1 thread:
about 31 µs per SkipLayerNormalization against about 15 µs for Add + LayerNormalization; the whole
model 2.58 → 2.30 ms of CPU at 13 tokens, 7.99 → 6.22 ms at 59). A float model exported without
``value_info`` runs without that fusion too.

Graph inputs and outputs and initializers keep their types and shapes. Run last: a pass after it
would find no dtypes on intermediate values.
"""

from __future__ import annotations

import onnx_ir as ir


class ClearIntermediateShapesPass(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        kept = set(graph.inputs) | set(graph.outputs) | set(graph.initializers.values())
        modified = False
        for node in graph:  # the main graph only: a subgraph's outputs keep their declared types
            for value in node.outputs:
                if value in kept or (value.type is None and value.shape is None):
                    continue
                value.type = None
                value.shape = None
                modified = True
        return ir.passes.PassResult(model, modified=modified)
