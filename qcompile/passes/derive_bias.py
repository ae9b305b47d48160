"""DeriveBiasPass: int32 biases for Conv/ConvTranspose/Gemm, and the fix for biases that overflow.

The integer kernel accumulates x_q·w_q in int32, in units of s_x·s_w[c]; the bias must be in the
same units:  bias_scale[c] = s_x · s_w[c] (computed in float32, as onnxruntime does when it fuses),
zero point 0,  bias_q[c] = round(b[c] / bias_scale[c]).

Overflow: when s_w[c] is tiny (a channel whose weights BatchNorm folding scaled to ~0) and b[c] is
not, |bias_q[c]| exceeds 2^31-1. The fix raises that channel's weight scale to
s_w[c] = |b[c]| / (s_x · (2^31-1)) (slightly more, for rounding), which only costs that channel
resolution it could not use anyway. Per-tensor weights raise their one scale. Each fix is a note.

Precondition: AssignQParamsPass has run. Must run before PlaceQDQPass, which rounds the weights
with the final scales.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompile.graph.notes import add_note
from qcompile.graph.queries import constant_array
from qcompile.quant.qparams import QParams
from qcompile.quant.spec import ANNOTATION_KEY, QPARAMS_KEY, BiasAnnotation

_INT32_LIMIT = float(np.iinfo(np.int32).max)
# Headroom: after the fix the largest |bias_q| is this fraction of the int32 limit.
_HEADROOM = 0.5


class DeriveBiasPass(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        by_name = {v.name: v for v in graph.inputs}
        by_name.update(graph.initializers)
        by_name.update({out.name: out for node in graph for out in node.outputs})
        modified = False
        for bias in list(graph.initializers.values()) + [o for n in graph for o in n.outputs]:
            annotation = bias.meta.get(ANNOTATION_KEY)
            if not isinstance(annotation, BiasAnnotation):
                continue
            x_qp: QParams | None = by_name[annotation.input].meta.get(QPARAMS_KEY)
            weight = by_name[annotation.weight]
            w_qp: QParams | None = weight.meta.get(QPARAMS_KEY)
            data = constant_array(bias)
            if x_qp is None or w_qp is None or data is None:
                continue
            bias_scale = _bias_scale(x_qp, w_qp, data.shape[0])
            needed = np.abs(data.astype(np.float64)) / bias_scale.astype(np.float64)
            overflow = needed > _INT32_LIMIT
            if np.any(overflow):
                w_qp = _raise_weight_scale(x_qp, w_qp, data, overflow)
                weight.meta[QPARAMS_KEY] = w_qp
                bias_scale = _bias_scale(x_qp, w_qp, data.shape[0])
                add_note(
                    model,
                    f"{annotation.node}: raised the weight scale of {int(overflow.sum())} channel(s) "
                    f"(up to {float(np.max(needed[overflow]) / (_INT32_LIMIT * _HEADROOM)):.3g}x) so the int32 bias fits",
                )
            bias.meta[QPARAMS_KEY] = QParams(
                scale=bias_scale,
                zero_point=np.zeros(bias_scale.shape, dtype=np.int32),
                spec=annotation.spec,
            )
            modified = True
        return ir.passes.PassResult(model, modified=modified)


def _bias_scale(x_qp: QParams, w_qp: QParams, channels: int) -> np.ndarray:
    scale = (np.float32(x_qp.scale) * w_qp.scale.astype(np.float32)).astype(np.float32)
    return np.broadcast_to(scale, (channels,)).copy()


def _raise_weight_scale(x_qp: QParams, w_qp: QParams, bias: np.ndarray, overflow: np.ndarray) -> QParams:
    target = np.abs(bias.astype(np.float64)) / (float(x_qp.scale) * _INT32_LIMIT * _HEADROOM)
    scale = w_qp.scale.astype(np.float64)
    if w_qp.spec.axis is None:
        scale = np.asarray(max(float(scale), float(target[overflow].max())))
    else:
        scale = np.where(overflow, np.maximum(scale, target), scale)
    return QParams(scale=scale.astype(np.float32), zero_point=w_qp.zero_point, spec=w_qp.spec)
