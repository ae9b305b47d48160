"""Typed, frozen compile options, nested by concern and validated at construction.

A field has one name here, in the JSON report and in the Python API; the CLI flag is that name with
dashes (``--activation-dtype``). The CLI maps flags to fields in exactly one function
(``qcompile.cli._options_from_flags``).
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any

from qcompile.errors import UsageError

# QuantizeLinear/DequantizeLinear with a per-axis scale need opset 13.
MIN_OPSET = 13


class ActivationDType(str, enum.Enum):
    """Integer type of quantized activations.

    uint8 (asymmetric) is the default: onnxruntime's x86 int8 kernels (QLinearConv, QGemm via
    MLAS) are fastest with u8 activations × s8 weights.
    """

    UINT8 = "uint8"
    INT8 = "int8"


class WeightGranularity(str, enum.Enum):
    PER_CHANNEL = "per_channel"
    PER_TENSOR = "per_tensor"


class CalibrationMethod(str, enum.Enum):
    """How an activation's range is chosen from what calibration observed."""

    MINMAX = "minmax"


@dataclass(frozen=True)
class SchemeOptions:
    """What is quantized and to which types."""

    activation_dtype: ActivationDType = ActivationDType.UINT8
    weight_granularity: WeightGranularity = WeightGranularity.PER_CHANNEL
    # Node names, fnmatch patterns over node names, or op types that stay float.
    keep_float: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "activation_dtype", ActivationDType(self.activation_dtype))
        object.__setattr__(self, "weight_granularity", WeightGranularity(self.weight_granularity))
        object.__setattr__(self, "keep_float", tuple(self.keep_float))


@dataclass(frozen=True)
class CalibrationOptions:
    method: CalibrationMethod = CalibrationMethod.MINMAX
    # Use at most this many calibration samples (None: all of them).
    max_samples: int | None = None
    # Number of random samples when calibrating on random data (``--calib random``).
    random_samples: int = 32
    seed: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "method", CalibrationMethod(self.method))
        if self.max_samples is not None and self.max_samples < 1:
            raise UsageError(f"calibration max_samples must be at least 1, got {self.max_samples}")
        if self.random_samples < 1:
            raise UsageError(f"random_samples must be at least 1, got {self.random_samples}")


@dataclass(frozen=True)
class VerificationOptions:
    enabled: bool = True
    # Fail the compile (exit code 5) when any output's SQNR in dB is below this.
    min_sqnr: float | None = None
    # Also report the SQNR of every quantized activation, in graph order.
    per_layer: bool = False
    # Without separate verification data, hold out this fraction of the calibration samples.
    holdout_fraction: float = 0.2
    max_samples: int | None = None
    # Fail the compile (exit code 5) when a quantized op is not fused into an int8 kernel.
    strict_fusion: bool = False

    def __post_init__(self) -> None:
        if not 0.0 < self.holdout_fraction < 1.0:
            raise UsageError(f"holdout_fraction must be in (0, 1), got {self.holdout_fraction}")
        if self.max_samples is not None and self.max_samples < 1:
            raise UsageError(f"verification max_samples must be at least 1, got {self.max_samples}")


@dataclass(frozen=True)
class OutputOptions:
    """Bounds on what the output model may use."""

    max_opset: int | None = None
    allow_contrib_ops: bool = True
    # Keep the exporter's per-node metadata (stack traces, module paths) and doc strings.
    keep_node_metadata: bool = False

    def __post_init__(self) -> None:
        if self.max_opset is not None and self.max_opset < MIN_OPSET:
            raise UsageError(
                f"max_opset {self.max_opset} is below {MIN_OPSET}, the first opset with per-axis "
                "QuantizeLinear/DequantizeLinear"
            )


@dataclass(frozen=True)
class CompileOptions:
    scheme: SchemeOptions = field(default_factory=SchemeOptions)
    calibration: CalibrationOptions = field(default_factory=CalibrationOptions)
    verification: VerificationOptions = field(default_factory=VerificationOptions)
    output: OutputOptions = field(default_factory=OutputOptions)
    # Pass names after which the IR is printed (debugging); "all" for every pass.
    dump_ir_after: tuple[str, ...] = ()
    show_progress: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "dump_ir_after", tuple(self.dump_ir_after))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: the same field names, enums as their values."""
        return _plain(dataclasses.asdict(self))


def _plain(obj: Any) -> Any:
    if isinstance(obj, enum.Enum):
        return obj.value
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj
