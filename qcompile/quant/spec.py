"""Annotations: what each tensor becomes, decided before any number is known.

Annotation (``passes/annotate.py``) writes one of these onto ``value.meta[ANNOTATION_KEY]``;
later passes read them. They are frozen and validated in ``__post_init__``.

- ``ActivationAnnotation``: calibrated from data. Tensors with the same ``group`` share one set of
  qparams (a Concat's inputs and output; a Reshape/MaxPool output and its input), which is what lets
  onnxruntime drop the Q/DQ pair around data-movement ops.
- ``WeightAnnotation``: quantized from its own values (symmetric, optionally per channel).
- ``ConstantAnnotation``: a constant operand of an elementwise op (Add/Mul), quantized per tensor
  with the activation type from its own values.
- ``BiasAnnotation``: a *derived* spec: int32, zero point 0, scale = input scale × weight scale
  (per output channel), so the integer accumulator of Conv/Gemm can add it directly.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import numpy as np

ANNOTATION_KEY = "qcompile.annotation"
QPARAMS_KEY = "qcompile.qparams"
DECISION_KEY = "qcompile.decision"
# A weight's integers chosen by RoundWeightsPass (its shape, the quantized dtype); PlaceQDQPass stores
# them instead of rounding to nearest.
ROUNDED_KEY = "qcompile.rounded"
# In the metadata_props of a node a pass created that must stay float: the reason annotation records
# (SmoothQuant's Mul).
FLOAT_REASON_KEY = "qcompile.float_reason"
# On an activation whose range a pass decided is taken by another calibration method (a
# CalibrationMethod): SmoothQuant's smoothed tensors, whose clipping it simulated.
RANGE_METHOD_KEY = "qcompile.range_method"


class QuantDType(str, enum.Enum):
    UINT8 = "uint8"
    INT8 = "int8"
    INT32 = "int32"

    @property
    def numpy(self) -> np.dtype:
        return np.dtype(self.value)

    @property
    def qmin(self) -> int:
        return int(np.iinfo(self.numpy).min)

    @property
    def qmax(self) -> int:
        return int(np.iinfo(self.numpy).max)


@dataclass(frozen=True)
class QuantSpec:
    """Integer type, symmetry and granularity of one quantized tensor."""

    dtype: QuantDType
    symmetric: bool
    axis: int | None = None  # per-channel axis; None means one scale for the tensor

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", QuantDType(self.dtype))
        if self.symmetric and self.dtype == QuantDType.UINT8:
            raise ValueError("symmetric quantization needs a signed type, not uint8")


@dataclass(frozen=True)
class ActivationAnnotation:
    spec: QuantSpec
    group: str  # name of the representative tensor whose range this one shares

    def __post_init__(self) -> None:
        if self.spec.axis is not None:
            raise ValueError("activations are quantized per tensor")


@dataclass(frozen=True)
class WeightAnnotation:
    spec: QuantSpec

    def __post_init__(self) -> None:
        if not self.spec.symmetric:
            raise ValueError("weights are quantized symmetrically (zero point 0)")


@dataclass(frozen=True)
class ConstantAnnotation:
    spec: QuantSpec


@dataclass(frozen=True)
class BiasAnnotation:
    input: str  # the activation multiplied by the weight
    weight: str
    node: str  # the Conv/Gemm that adds it

    @property
    def spec(self) -> QuantSpec:
        return QuantSpec(QuantDType.INT32, symmetric=True, axis=0)


Annotation = ActivationAnnotation | WeightAnnotation | ConstantAnnotation | BiasAnnotation


# The reason given to nodes that compute shapes, indices or masks: not candidates at all.
NOT_FLOAT_DATA = "computes no float tensor (shape, index or mask arithmetic)"


@dataclass(frozen=True)
class NodeDecision:
    """Whether a node runs quantized, and in words why not."""

    quantized: bool
    reason: str = ""
