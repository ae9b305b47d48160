"""Scale / zero-point math (numpy only).

Affine quantization as in the ONNX QuantizeLinear spec:
    q = saturate(round_half_to_even(x / scale) + zero_point),   x' = (q - zero_point) * scale

Asymmetric range [lo, hi] → scale = (hi - lo) / (qmax - qmin), zero_point = qmin - round(lo / scale),
after widening the range to include 0 so that 0.0 is exactly representable (zero padding, ReLU).
Symmetric: zero_point = 0 and scale = max(|lo|, |hi|) / ((qmax - qmin) / 2), using the restricted
range [-127, 127] for int8 so that -x is representable whenever x is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qcompile.quant.spec import QuantDType, QuantSpec

# Ranges narrower than this are widened: a zero scale would divide by zero in QuantizeLinear.
_MIN_SCALE = np.float32(1e-8)
# The scale of an empty range (every value seen was 0), as onnxruntime's quantizer chooses: 0 stays
# exact, and int8 kernels that bound the ratio of input to output scale (QLinearGlobalAveragePool
# refuses x_scale / (y_scale * pixels) >= 256) accept it, which the floor above would not be.
ZERO_RANGE_SCALE = np.float32(1.0)


@dataclass(frozen=True)
class QParams:
    """Resolved quantization parameters of one tensor."""

    scale: np.ndarray  # float32, shape () or (channels,)
    zero_point: np.ndarray  # dtype of the quantized tensor, same shape as scale
    spec: QuantSpec
    # Every value seen was 0 (on every channel): the scale is ZERO_RANGE_SCALE. For the report.
    zero_range: bool = False

    def __post_init__(self) -> None:
        if self.scale.shape != self.zero_point.shape:
            raise ValueError("scale and zero_point shapes differ")
        if not np.all(np.isfinite(self.scale)) or np.any(self.scale <= 0):
            raise ValueError("scales must be finite and positive")

    @property
    def dtype(self) -> QuantDType:
        return self.spec.dtype

    def to_json(self) -> dict:
        return {
            "dtype": self.spec.dtype.value,
            "axis": self.spec.axis,
            "scale": self.scale.astype(float).tolist(),
            "zero_point": self.zero_point.astype(int).tolist(),
        }


def qparams_from_range(lo: np.ndarray, hi: np.ndarray, spec: QuantSpec) -> QParams:
    """Scale and zero point covering [lo, hi] (elementwise for per-channel ranges)."""
    lo = np.minimum(np.asarray(lo, dtype=np.float64), 0.0)
    hi = np.maximum(np.asarray(hi, dtype=np.float64), 0.0)
    empty = hi - lo == 0.0
    dt = spec.dtype
    if spec.symmetric:
        # Restricted range: [-127, 127] for int8; the int32 bias uses its own derivation.
        qmax = dt.qmax
        absmax = np.maximum(np.abs(lo), np.abs(hi))
        scale = np.maximum(absmax / qmax, _MIN_SCALE)
        scale = np.where(empty, ZERO_RANGE_SCALE, scale).astype(np.float32)
        zero_point = np.zeros(scale.shape, dtype=dt.numpy)
    else:
        span = np.maximum(hi - lo, _MIN_SCALE * (dt.qmax - dt.qmin))
        scale = np.where(empty, ZERO_RANGE_SCALE, span / (dt.qmax - dt.qmin)).astype(np.float32)
        zp = np.round(dt.qmin - lo / scale.astype(np.float64))
        zero_point = np.clip(zp, dt.qmin, dt.qmax).astype(dt.numpy)
    return QParams(scale=scale, zero_point=zero_point, spec=spec, zero_range=bool(np.all(empty)))


def _broadcast_shape(qp: QParams, ndim: int) -> tuple[int, ...]:
    if qp.spec.axis is None or qp.scale.ndim == 0:
        return ()
    shape = [1] * ndim
    shape[qp.spec.axis] = qp.scale.shape[0]
    return tuple(shape)


def quantize(x: np.ndarray, qp: QParams) -> np.ndarray:
    """QuantizeLinear in numpy (round half to even, saturate), matching onnxruntime."""
    shape = _broadcast_shape(qp, x.ndim)
    scale = qp.scale.reshape(shape).astype(np.float32)
    zp = qp.zero_point.reshape(shape).astype(np.int64)
    q = np.rint(x.astype(np.float32) / scale).astype(np.int64) + zp
    return np.clip(q, qp.dtype.qmin, qp.dtype.qmax).astype(qp.dtype.numpy)


def dequantize(q: np.ndarray, qp: QParams) -> np.ndarray:
    shape = _broadcast_shape(qp, q.ndim)
    scale = qp.scale.reshape(shape).astype(np.float32)
    zp = qp.zero_point.reshape(shape).astype(np.int64)
    return ((q.astype(np.int64) - zp) * scale).astype(np.float32)
