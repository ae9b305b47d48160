"""EliminateIdentityPass: onnx-ir's identity elimination, keeping an Identity between two graph outputs.

onnx-ir (1.1) removes ``y = Identity(x)`` whose ``y`` is a graph output by renaming ``x`` to ``y``.
When ``x`` is a graph output as well, both outputs become one value under one name: the model loses
output ``x`` and lists ``y`` twice. Such an Identity is kept (it stays float, with its reason in the
report); every other case is onnx-ir's. Found by the graph fuzzer (``tests/fuzz``): a Dropout, which
``remove_dropout`` turns into an Identity, between two graph outputs.
"""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common_passes


def _joins_two_graph_outputs(node: ir.Node) -> bool:
    if node.op_type != "Identity" or node.domain != "" or len(node.inputs) != 1 or len(node.outputs) != 1:
        return False
    source = node.inputs[0]
    return source is not None and source.is_graph_output() and node.outputs[0].is_graph_output()


class EliminateIdentityPass(common_passes.IdentityEliminationPass):
    # The per-node hook of onnx-ir's pass; tests/fuzz/test_regressions.py fails if it stops being called.
    def _try_eliminate_identity_node(self, node: ir.Node) -> bool:
        if _joins_two_graph_outputs(node):
            return False
        return super()._try_eliminate_identity_node(node)
