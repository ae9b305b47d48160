"""Typed, frozen compile options, nested by concern and validated at construction.

A field has one name here, in the JSON report and in the Python API; the CLI flag is that name with
dashes (``--activation-dtype``). The CLI maps flags to fields in exactly one function
(``qcompile.cli._options_from_flags``).
"""

from __future__ import annotations

import dataclasses
import enum
import os
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
    """How an activation's range is chosen from what calibration observed.

    minmax: [min, max] of everything seen. The others read a histogram (``calibration/histogram.py``)
    and clip (``calibration/range_methods.py``): percentile (the ``percentile``-th of each tail, or of
    |x|), entropy (smallest KL divergence, TensorRT's method), mse (smallest expected squared error).
    """

    MINMAX = "minmax"
    PERCENTILE = "percentile"
    ENTROPY = "entropy"
    MSE = "mse"


class WeightMethod(str, enum.Enum):
    """How a weight's symmetric range is chosen from its values (per channel or per tensor).

    minmax: max |w|. mse: the fraction of max |w| in [0.5, 1] minimizing the squared rounding and
    clipping error of the weights themselves (``quant/weight_range.py``).
    """

    MINMAX = "minmax"
    MSE = "mse"


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


def _enum_field(cls: type[enum.Enum], value: Any, what: str) -> Any:
    try:
        return cls(value)
    except ValueError:
        allowed = ", ".join(e.value for e in cls)
        raise UsageError(f"{what} must be one of {allowed}, got {value!r}") from None


# The fewest histogram bins: one per uint8 level, so entropy has a candidate finer than the levels.
MIN_HISTOGRAM_BINS = 256


@dataclass(frozen=True)
class CalibrationOptions:
    # Activation ranges. mse was best or within 0.1 dB of the best on every model measured
    # (README, "Calibration methods"; benchmarks/calibration_methods.py).
    method: CalibrationMethod = CalibrationMethod.MSE
    # percentile method: the percentile of each tail (of |x| for symmetric specs) kept unclipped.
    percentile: float = 99.99
    # Histogram bins for percentile / entropy / mse (memory per observed tensor group: 8 bytes each).
    bins: int = 2048
    # Weight ranges (symmetric, from the weights' values). mse measured within ±0.2 dB of minmax,
    # neither better on all models, and costs compile time: minmax stays the default.
    weight_method: WeightMethod = WeightMethod.MINMAX
    # A JSON file of calibrated ranges: used when its key (model, data, settings) matches, written
    # when absent, refused when it was made for another model, data or settings.
    cache: str | None = None
    # Use at most this many calibration samples (None: all of them).
    max_samples: int | None = None
    # Number of random samples when calibrating on random data (``--calib random``).
    random_samples: int = 32
    seed: int = 0
    # Fold each layer's mean output error into its int32 bias, measured on this many calibration
    # batches (CorrectBiasPass); 0 turns it off. Off by default for its cost: one measurement per
    # layer (ResNet-18: 2.1 s → 7.5 s compile). Measured with 8 batches: digits +4.2 dB (accuracy
    # 99.17% → 99.44%, float's), ResNet-18 +1.2 dB, MobileNetV2 +0.03 dB.
    bias_correction_batches: int = 0

    def __post_init__(self) -> None:
        if self.bias_correction_batches < 0:
            raise UsageError(f"bias_correction_batches must be >= 0, got {self.bias_correction_batches}")
        object.__setattr__(self, "method", _enum_field(CalibrationMethod, self.method, "calibration method"))
        object.__setattr__(self, "weight_method", _enum_field(WeightMethod, self.weight_method, "weight_method"))
        if self.cache is not None:
            object.__setattr__(self, "cache", os.fspath(self.cache))
        if not 50.0 < self.percentile <= 100.0:
            raise UsageError(f"percentile must be in (50, 100], got {self.percentile}")
        if isinstance(self.bins, bool) or not isinstance(self.bins, int) or not MIN_HISTOGRAM_BINS <= self.bins <= 1 << 20:
            raise UsageError(f"calibration bins must be an integer in [{MIN_HISTOGRAM_BINS}, {1 << 20}], got {self.bins!r}")
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
class PrecisionOptions:
    """Per-layer precision (``qcompile.precision``): overrides, the accuracy budget, a recipe to replay."""

    # PATTERN=PRECISION (fp32, int8, int4, fp16, int16), by node name, fnmatch pattern or op type.
    precision: tuple[str, ...] = ()
    # Search for the cheapest assignment meeting this budget: "cosine>=0.999", "sqnr>=35", "top1-drop<=0.5".
    budget: str | None = None
    # Replay a recipe JSON written by a search (no search, no calibration).
    recipe: str | None = None

    def __post_init__(self) -> None:
        from qcompile.precision.budget import parse_budget
        from qcompile.precision.policy import parse_rule

        object.__setattr__(self, "precision", tuple(self.precision))
        for text in self.precision:
            parse_rule(text)
        if self.budget is not None:
            parse_budget(self.budget)
        if self.recipe is not None:
            object.__setattr__(self, "recipe", os.fspath(self.recipe))
        if self.recipe is not None and self.budget is not None:
            raise UsageError("--recipe replays a finished search; it cannot be combined with --budget")


@dataclass(frozen=True)
class CompileOptions:
    scheme: SchemeOptions = field(default_factory=SchemeOptions)
    calibration: CalibrationOptions = field(default_factory=CalibrationOptions)
    verification: VerificationOptions = field(default_factory=VerificationOptions)
    output: OutputOptions = field(default_factory=OutputOptions)
    precision: PrecisionOptions = field(default_factory=PrecisionOptions)
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
