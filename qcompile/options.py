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


class Target(str, enum.Enum):
    """What the model is compiled for (``qcompile/targets.py`` holds each target's profile).

    ``--provider`` elsewhere means where a model is *run*; the target is what it is *built* for.
    """

    CPU = "cpu"
    CUDA = "cuda"
    TENSORRT = "tensorrt"


class WeightGranularity(str, enum.Enum):
    PER_CHANNEL = "per_channel"
    PER_TENSOR = "per_tensor"


class WeightRounding(str, enum.Enum):
    """How weights are rounded to int8 once their scales are known.

    nearest: round half to even (QuantizeLinear's rule). optimized: per weight element, down or up
    (at most one step from nearest), chosen to minimize each layer's output error on calibration
    inputs (``passes/round_weights.py``).
    """

    NEAREST = "nearest"
    OPTIMIZED = "optimized"


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
    # A MatMul (constant weight) whose input comes from a float op quantizes that input at run time
    # (DynamicQuantizeLinear, fused by onnxruntime into DynamicQuantizeMatMul / MatMulIntegerToFloat
    # with the bias) instead of through a standalone calibrated QuantizeLinear. uint8 activations only.
    dynamic_matmul: bool = True
    # Dynamically quantized MatMuls sharing an input (attention's Q/K/V projections) run as one
    # MatMulInteger on concatenated weights and a Split; bit-identical, fewer kernels.
    fuse_sibling_matmuls: bool = True
    # MatMuls of two activations (attention's Q·Kᵀ and softmax·V) in int8 (onnxruntime's
    # QLinearMatMul / MatMulIntegerToFloat). False keeps them float: all-MiniLM-L6-v2 measured
    # mean cosine 0.9921 with them int8, 0.9925 float before SmoothQuant; 0.9979 and 0.9981 with it.
    quantize_activation_matmuls: bool = True

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
    # A JSON file of calibrated ranges and SmoothQuant decisions: used when its key (model, data, settings) matches, written
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
    # Cross-layer equalization before calibration (EqualizeCrossLayerPass). Off by default: with
    # per-channel weights (the default) it lowered the output SQNR on all three conv nets measured
    # (digits 39.8 → 37.5 dB, ResNet-18 29.8 → 29.7, MobileNetV2 12.6 → 12.5); it is for
    # per-tensor weights and for layers whose channel ranges differ by orders of magnitude.
    equalize_cross_layer: bool = False
    # optimized (RoundWeightsPass) measured digits 39.8 → 44.3 dB, ResNet-18 29.8 → 31.9,
    # MobileNetV2 12.6 → 12.9 (per-tensor weights: ResNet-18 27.3 → 30.7). Opt-in for its cost:
    # about 2-4x the calibration time (one sweep over every weight, 2048 sampled rows per layer).
    weight_rounding: WeightRounding = WeightRounding.NEAREST

    def __post_init__(self) -> None:
        if self.bias_correction_batches < 0:
            raise UsageError(f"bias_correction_batches must be >= 0, got {self.bias_correction_batches}")
        object.__setattr__(self, "method", _enum_field(CalibrationMethod, self.method, "calibration method"))
        object.__setattr__(self, "weight_method", _enum_field(WeightMethod, self.weight_method, "weight_method"))
        object.__setattr__(self, "weight_rounding", _enum_field(WeightRounding, self.weight_rounding, "weight_rounding"))
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
class SmoothQuantOptions:
    """SmoothQuant (``passes/smooth_quant.py``): move activation outlier channels into MatMul/Gemm weights.

    For each group of MatMul/Gemm reading one activation, α is picked from ``alphas`` by the smallest
    simulated quantized output error on ``rows`` reservoir-sampled calibration rows; nothing is applied
    unless that error is at least ``min_gain`` (a fraction) below the unsmoothed one.
    """

    enabled: bool = True
    alphas: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
    # 0.3 left one FFN-out of MiniLM unsmoothed (its GELU then stayed int8): mean cosine 0.9978 vs 0.9979.
    min_gain: float = 0.1
    rows: int = 512
    # Fold a smoothing Mul left in the graph into the weight upstream that makes its channels
    # (``passes/fold_smoothing_mul.py``: the attention context into the V projection): one float
    # kernel fewer per layer, but V is then quantized smoothed; MiniLM 23.54 → 23.39 dB, so off.
    fold_upstream: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "alphas", tuple(float(a) for a in self.alphas))
        if not self.alphas or not all(0.0 <= a <= 1.0 for a in self.alphas):
            raise UsageError(f"smooth_quant alphas must be a non-empty list of numbers in [0, 1], got {self.alphas}")
        if not 0.0 <= self.min_gain < 1.0:
            raise UsageError(f"smooth_quant min_gain must be in [0, 1), got {self.min_gain}")
        if isinstance(self.rows, bool) or not isinstance(self.rows, int) or self.rows < 1:
            raise UsageError(f"smooth_quant rows must be a positive integer, got {self.rows!r}")


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
    # Time float vs compiled on the target's provider (batch 1 and 8, interleaved medians) for the
    # report; a few seconds at most (``verify/latency.py``, ``LATENCY_BUDGET_S``).
    latency: bool = True

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
    # What the model is compiled for; its profile (``qcompile/targets.py``) decides the scheme's
    # types and where Q/DQ go, or that float parts become fp16 (cuda).
    target: Target = Target.CPU
    scheme: SchemeOptions = field(default_factory=SchemeOptions)
    calibration: CalibrationOptions = field(default_factory=CalibrationOptions)
    smooth_quant: SmoothQuantOptions = field(default_factory=SmoothQuantOptions)
    verification: VerificationOptions = field(default_factory=VerificationOptions)
    output: OutputOptions = field(default_factory=OutputOptions)
    precision: PrecisionOptions = field(default_factory=PrecisionOptions)
    # Pass names after which the IR is printed (debugging); "all" for every pass.
    dump_ir_after: tuple[str, ...] = ()
    show_progress: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "target", _enum_field(Target, self.target, "target"))
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
