"""The int4 weight pass for the nodes the precision policy assigns int4.

``qcompile.passes.quantize_int4_weights.QuantizeInt4WeightsPass``: blockwise int4 MatMul weights
(opset 21 DequantizeLinear with ``block_size``, along K), which onnxruntime fuses into MatMulNBits.
"""

from __future__ import annotations

from collections.abc import Collection

import onnx_ir as ir

from qcompile.passes.quantize_int4_weights import QuantizeInt4WeightsPass

# Rows of K per scale: onnxruntime's MatMulNBits takes powers of two from 16; 32 is its common
# default and keeps the scales at 1/16 of the int4 weight bytes (fp32 scale per 32 half-bytes).
BLOCK_SIZE = 32


def int4_weights_pass(node_names: Collection[str], max_opset: int | None) -> ir.passes.PassBase:
    return QuantizeInt4WeightsPass(node_names, block_size=BLOCK_SIZE, max_opset=max_opset)
