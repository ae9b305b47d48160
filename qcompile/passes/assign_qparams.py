"""AssignQParamsPass: turn annotations into numbers.

- Activations take the qparams calibrated for their group (given to the pass).
- Weights: symmetric int8 from their own values, per output channel (max |w| over the other axes)
  or per tensor.
- Constant operands (Add/Mul): per tensor, the activation type, from their own min/max.

Biases are derived later (``DeriveBiasPass``), once weight scales are final.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from qcompile.errors import InternalError
from qcompile.graph.queries import constant_array
from qcompile.quant.qparams import QParams, qparams_from_range
from qcompile.quant.spec import (
    ANNOTATION_KEY,
    QPARAMS_KEY,
    ActivationAnnotation,
    ConstantAnnotation,
    WeightAnnotation,
)


def _range_of(data: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    data = data.astype(np.float64)
    if axis is None:
        return np.asarray(data.min()), np.asarray(data.max())
    reduce_axes = tuple(i for i in range(data.ndim) if i != axis)
    return data.min(axis=reduce_axes), data.max(axis=reduce_axes)


class AssignQParamsPass(ir.passes.InPlacePass):
    def __init__(self, activation_qparams: Mapping[str, QParams]) -> None:
        super().__init__()
        self.activation_qparams = activation_qparams

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        graph = model.graph
        values = list(graph.inputs) + list(graph.initializers.values())
        values += [out for node in graph for out in node.outputs]
        for value in values:
            annotation = value.meta.get(ANNOTATION_KEY)
            if annotation is None:
                continue
            if isinstance(annotation, ActivationAnnotation):
                qparams = self.activation_qparams.get(annotation.group)
                if qparams is None:
                    raise InternalError(f"no calibrated qparams for tensor {value.name!r} (group {annotation.group!r})")
            elif isinstance(annotation, (WeightAnnotation, ConstantAnnotation)):
                data = constant_array(value)
                if data is None:
                    raise InternalError(f"annotated constant {value.name!r} has no data")
                lo, hi = _range_of(data, annotation.spec.axis)
                qparams = qparams_from_range(lo, hi, annotation.spec)
            else:
                continue  # biases: DeriveBiasPass
            value.meta[QPARAMS_KEY] = qparams
            modified = True
        return ir.passes.PassResult(model, modified=modified)
