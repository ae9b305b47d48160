"""The int4 weight pass, when this build has it.

``qcompile.passes.quantize_int4_weights.QuantizeInt4WeightsPass`` (blockwise int4 MatMul weights,
opset 21 DequantizeLinear with ``block_size``) is written on another branch; until it is merged an
int4 assignment is refused here in one line rather than silently compiled as float.
"""

from __future__ import annotations

from collections.abc import Collection

import onnx_ir as ir

from qcompile.errors import UsageError

BLOCK_SIZE = 32


def int4_weights_pass(node_names: Collection[str], max_opset: int | None) -> ir.passes.PassBase:
    try:
        from qcompile.passes.quantize_int4_weights import QuantizeInt4WeightsPass
    except ImportError:
        raise UsageError(
            "int4 weights are not available yet in this build (qcompile.passes.quantize_int4_weights is missing)"
        ) from None
    return QuantizeInt4WeightsPass(node_names, block_size=BLOCK_SIZE, max_opset=max_opset)
