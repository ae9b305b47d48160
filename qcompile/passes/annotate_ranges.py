"""AnnotateRangesPass: mark every float32 tensor for range calibration (the fp16 path).

Rule: each float32 graph input and node output gets an ``ActivationAnnotation`` with a symmetric
int8 spec in a group of its own, so the ordinary calibration stage (observation model, observers,
cache) observes it. Nothing is quantized: the fp16 conversion reads the largest |x| back from the
qparams, ``max|x| = scale × 127`` for a symmetric int8 spec calibrated by min/max
(``quant/qparams.py``), to keep tensors that would overflow fp16 in fp32.
"""

from __future__ import annotations

import onnx_ir as ir

from qcompile.quant.qparams import QParams
from qcompile.quant.spec import ANNOTATION_KEY, ActivationAnnotation, QuantDType, QuantSpec

RANGE_SPEC = QuantSpec(QuantDType.INT8, symmetric=True)


class AnnotateRangesPass(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        for value in list(graph.inputs) + [out for node in graph for out in node.outputs]:
            if value.dtype == ir.DataType.FLOAT and ANNOTATION_KEY not in value.meta:
                value.meta[ANNOTATION_KEY] = ActivationAnnotation(RANGE_SPEC, value.name)
        # Annotations live in memory only: the model's content is unchanged.
        return ir.passes.PassResult(model, modified=False)


def max_abs_from_qparams(qparams: dict[str, QParams]) -> dict[str, float]:
    """Group (tensor) name → the largest |x| calibration saw, from symmetric min/max qparams."""
    return {name: float(qp.scale) * qp.spec.dtype.qmax for name, qp in qparams.items() if qp.spec.symmetric}
