"""SmoothQuant's choice of α per group, from the group's channel statistics and weights.

For activations X (statistics: max |X_k| and a reservoir sample of rows) read by the weights W_j of
one group, and a per-channel factor

    s_k = max|X_k|^α / max|W_k|^(1−α)        (max|W_k| over row k of every W_j),

the simulated output error of a choice is Σ_j ||X W_j − dq(q(X/s)) dq(q(s W_j))||² / ||X W_j||² on
the sampled rows: X/s quantized per tensor with the range the calibration's observer picks from the
sample itself (the configured method, or min/max: a smoothed tensor has no outlier channels left
worth clipping, and calibration then uses the method simulated), s W_j with the weight ranges the
compile will use. ``choose_smoothing`` tries every α of ``SmoothQuantOptions.alphas`` and keeps the
lowest error; the group is smoothed only when it is at least ``min_gain`` below the unsmoothed one
(s = 1, the configured method).

The ``SmoothDecision`` is a pure function of the statistics, the weights and the options, which is
what lets the calibration cache store it in place of the statistics (``calibration/cache``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from qcompile.calibration.channel_stats import ChannelStats
from qcompile.calibration.observers import make_observer
from qcompile.options import (
    ActivationDType,
    CalibrationMethod,
    CalibrationOptions,
    SchemeOptions,
    SmoothQuantOptions,
    WeightGranularity,
    WeightMethod,
)
from qcompile.quant.qparams import dequantize, qparams_from_range, quantize
from qcompile.quant.spec import QuantDType, QuantSpec
from qcompile.quant.weight_range import minmax_weight_range, mse_weight_range

# Bounds on s: a channel that is all zeros (in X or W) keeps s = 1.
_S_MIN, _S_MAX = 1e-5, 1e5


@dataclass(frozen=True)
class SmoothDecision:
    """What the search found for one group: smooth by ``factors`` (s, float64 (K,)) or not (None)."""

    alpha: float | None  # the best α tried; None when none beat the unsmoothed error
    method: CalibrationMethod  # the activation range method simulated for X/s
    baseline: float  # the unsmoothed simulated error
    error: float  # the best simulated error
    factors: np.ndarray | None

    @property
    def gain(self) -> float:
        return 1.0 - self.error / self.baseline if self.baseline > 0 else 0.0


def smoothing_factors(x_absmax: np.ndarray, w_absmax: np.ndarray, alpha: float) -> np.ndarray:
    """s_k = max|X_k|^α / max|W_k|^(1−α); 1 where either maximum is 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.power(x_absmax, alpha) / np.power(w_absmax, 1.0 - alpha)
    usable = (x_absmax > 0) & (w_absmax > 0) & np.isfinite(s)
    return np.clip(np.where(usable, s, 1.0), _S_MIN, _S_MAX)


def choose_smoothing(
    stats: ChannelStats,
    weights: list[np.ndarray],
    options: SmoothQuantOptions,
    scheme: SchemeOptions,
    calibration: CalibrationOptions,
) -> SmoothDecision:
    """The best α for a group whose weights (each (K, N_j)) read the tensor ``stats`` describes."""
    w_absmax = np.max([np.abs(w).max(axis=1) for w in weights], axis=0).astype(np.float64)
    x = stats.rows
    # One product for the whole group: its weights side by side, each scored on its own columns.
    reference = x @ np.concatenate(weights, axis=1)
    spans = np.cumsum([0] + [w.shape[1] for w in weights])
    energies = [max(float(np.sum(reference[:, a:b] ** 2)), 1e-30) for a, b in zip(spans, spans[1:])]

    def error(s: np.ndarray, method: CalibrationMethod, quantized_weights: np.ndarray) -> float:
        out = _fake_quantize_input(x / s, method, scheme, calibration) @ quantized_weights
        squared = (out - reference) ** 2
        return sum(float(np.sum(squared[:, a:b])) / e for a, b, e in zip(spans, spans[1:], energies))

    def fake_quantize_weights(s: np.ndarray) -> np.ndarray:
        return np.concatenate([_fake_quantize_weight((w * s[:, None]).astype(np.float32), scheme, calibration) for w in weights], axis=1)

    configured = calibration.method
    ones = np.ones_like(w_absmax)
    baseline = error(ones, configured, fake_quantize_weights(ones))
    best_alpha, best_error, best_s, best_method = None, baseline, None, configured
    # A smoothed tensor has no outlier channels left to clip: min/max may beat the configured
    # method there, and the calibration then uses the method simulated.
    methods = dict.fromkeys([configured, CalibrationMethod.MINMAX])
    for alpha in options.alphas:
        s = smoothing_factors(stats.absmax, w_absmax, alpha)
        quantized_weights = fake_quantize_weights(s)
        for method in methods:
            candidate = error(s, method, quantized_weights)
            if candidate < best_error:
                best_alpha, best_error, best_s, best_method = alpha, candidate, s, method
    if best_s is not None and best_error > (1.0 - options.min_gain) * baseline:
        best_s = None  # not enough gain to be worth a rewrite
    return SmoothDecision(best_alpha, best_method, baseline, best_error, best_s)


def _fake_quantize_input(xs: np.ndarray, method: CalibrationMethod, scheme: SchemeOptions, calibration: CalibrationOptions) -> np.ndarray:
    """dq(q(xs)) with the range ``method`` picks from xs itself (the calibration's observer)."""
    xs = xs.astype(np.float32)
    dtype = QuantDType.UINT8 if scheme.activation_dtype == ActivationDType.UINT8 else QuantDType.INT8
    observer = make_observer(QuantSpec(dtype, symmetric=False), dataclasses.replace(calibration, method=method), "smooth_quant")
    observer.update(xs)
    qp = observer.qparams()
    return dequantize(quantize(xs, qp), qp)


def _fake_quantize_weight(w: np.ndarray, scheme: SchemeOptions, calibration: CalibrationOptions) -> np.ndarray:
    axis = 1 if scheme.weight_granularity == WeightGranularity.PER_CHANNEL else None
    spec = QuantSpec(QuantDType.INT8, symmetric=True, axis=axis)
    if calibration.weight_method == WeightMethod.MSE:
        lo, hi = mse_weight_range(w, spec)
    else:
        lo, hi = minmax_weight_range(w, axis)
    qp = qparams_from_range(lo, hi, spec)
    return dequantize(quantize(w, qp), qp)
