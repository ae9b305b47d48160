"""AssignQParamsPass: turn annotations into numbers.

- Activations take the qparams calibrated for their group (given to the pass).
- Weights: symmetric int8 from their own values, per output channel or per tensor: max |w|
  (``weight_method`` minmax) or the MSE-optimal fraction of it (mse; ``quant/weight_range.py``).
- Constant operands (Add/Mul): per tensor, the activation type, from their own min/max.

Biases are derived later (``DeriveBiasPass``), once weight scales are final.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from qcompile.errors import InternalError
from qcompile.graph.notes import add_note
from qcompile.graph.queries import constant_array
from qcompile.options import WeightMethod
from qcompile.quant.qparams import QParams, qparams_from_range
from qcompile.quant.weight_range import minmax_weight_range, mse_weight_range
from qcompile.quant.spec import (
    ANNOTATION_KEY,
    QPARAMS_KEY,
    ActivationAnnotation,
    ConstantAnnotation,
    WeightAnnotation,
)


class AssignQParamsPass(ir.passes.InPlacePass):
    def __init__(
        self, activation_qparams: Mapping[str, QParams], weight_method: WeightMethod = WeightMethod.MINMAX
    ) -> None:
        super().__init__()
        self.activation_qparams = activation_qparams
        self.weight_method = WeightMethod(weight_method)

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        graph = model.graph
        self.activation_qparams = _respect_pooling_bounds(model, dict(self.activation_qparams))
        values = list(graph.inputs) + list(graph.initializers.values())
        values += [out for node in graph for out in node.outputs]
        # Constants first: a table lookup's output (Gather of a constant) shares its table's qparams,
        # so that onnxruntime gathers int8 rows and dequantizes only those.
        values.sort(key=lambda v: not isinstance(v.meta.get(ANNOTATION_KEY), (WeightAnnotation, ConstantAnnotation)))
        by_name = {v.name: v for v in values}
        for value in values:
            annotation = value.meta.get(ANNOTATION_KEY)
            if annotation is None:
                continue
            if isinstance(annotation, ActivationAnnotation):
                table = by_name.get(annotation.group)
                qparams = self.activation_qparams.get(annotation.group)
                if table is not None and isinstance(table.meta.get(ANNOTATION_KEY), ConstantAnnotation):
                    qparams = table.meta[QPARAMS_KEY]
                if qparams is None:
                    raise InternalError(f"no calibrated qparams for tensor {value.name!r} (group {annotation.group!r})")
            elif isinstance(annotation, (WeightAnnotation, ConstantAnnotation)):
                data = constant_array(value)
                if data is None:
                    raise InternalError(f"annotated constant {value.name!r} has no data")
                if isinstance(annotation, WeightAnnotation) and self.weight_method == WeightMethod.MSE:
                    lo, hi = mse_weight_range(data, annotation.spec)
                else:
                    lo, hi = minmax_weight_range(data, annotation.spec.axis)
                qparams = qparams_from_range(lo, hi, annotation.spec)
            else:
                continue  # biases: DeriveBiasPass
            value.meta[QPARAMS_KEY] = qparams
            modified = True
        return ir.passes.PassResult(model, modified=modified)


# onnxruntime's QLinearAveragePool / QLinearGlobalAveragePool refuse x_scale / (y_scale · pixels)
# ≥ 256 (seen with onnxruntime 1.32 on an output range 1000x narrower than the input's); keeping
# y_scale ≥ x_scale / 255 satisfies it for any pool size.
_POOLS = ("AveragePool", "GlobalAveragePool")
_POOL_SCALE_RATIO = 255.0


def _respect_pooling_bounds(model: ir.Model, qparams: dict[str, QParams]) -> dict[str, QParams]:
    """Widen the output range of an int8 average pool whose scale is far below its input's."""
    for node in model.graph:
        if node.op_type not in _POOLS or not node.inputs or not node.outputs:
            continue
        x_ann = node.inputs[0].meta.get(ANNOTATION_KEY) if node.inputs[0] is not None else None
        y_ann = node.outputs[0].meta.get(ANNOTATION_KEY)
        if not (isinstance(x_ann, ActivationAnnotation) and isinstance(y_ann, ActivationAnnotation)):
            continue
        x_qp, y_qp = qparams.get(x_ann.group), qparams.get(y_ann.group)
        if x_qp is None or y_qp is None:
            continue
        floor = float(x_qp.scale) / _POOL_SCALE_RATIO
        if float(y_qp.scale) >= floor:
            continue
        factor = floor / float(y_qp.scale) * (1 + 1e-6)
        spec = y_qp.spec
        lo = (spec.dtype.qmin - float(y_qp.zero_point)) * float(y_qp.scale)
        hi = (spec.dtype.qmax - float(y_qp.zero_point)) * float(y_qp.scale)
        qparams[y_ann.group] = qparams_from_range(np.asarray(lo * factor), np.asarray(hi * factor), spec)
        add_note(model, f"{node.name}: widened the output range ×{factor:.3g} to meet onnxruntime's int8 pooling bound")
    return qparams
