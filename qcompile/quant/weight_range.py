"""Weight ranges: min/max, or the MSE-optimal symmetric clipping threshold, per channel.

MinMax: [min w, max w] of each channel (or of the tensor), which a symmetric spec turns into
scale = max|w| / qmax.

MSE: for each channel c, with m_c = max|w_c|, try thresholds t = α·m_c for ``CANDIDATES`` values of
α evenly spaced in [0.5, 1] and keep the one minimizing

    Σ_i (w_ci − dq(q(w_ci; s)))²,   s = t / qmax,

the squared error of rounding the weights inside [−t, t] plus clipping those outside. α = 1 (min/max)
is a candidate and wins ties, so MSE is never worse than min/max on the weights themselves.
"""

from __future__ import annotations

import numpy as np

from qcompile.quant.spec import QuantSpec

CANDIDATES = 100
LOWEST_FRACTION = 0.5
# Weights per chunk of channels, bounding the (candidates-at-a-time) temporaries.
_CHUNK = 1 << 22


def minmax_weight_range(data: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    data = data.astype(np.float64)
    if axis is None:
        return np.asarray(data.min()), np.asarray(data.max())
    reduce_axes = tuple(i for i in range(data.ndim) if i != axis)
    return data.min(axis=reduce_axes), data.max(axis=reduce_axes)


def _channels_first(data: np.ndarray, axis: int | None) -> np.ndarray:
    if axis is None:
        return data.reshape(1, -1)
    return np.moveaxis(data, axis, 0).reshape(data.shape[axis], -1)


def mse_weight_range(data: np.ndarray, spec: QuantSpec) -> tuple[np.ndarray, np.ndarray]:
    """The symmetric range [−t, t] per channel (shape () per tensor) minimizing the squared error."""
    if not spec.symmetric:
        raise ValueError("the weight MSE search is for symmetric specs")
    qmax = spec.dtype.qmax
    weights = _channels_first(np.asarray(data, dtype=np.float32), spec.axis)
    magnitude = np.abs(weights).max(axis=1).astype(np.float64)
    best = magnitude.copy()
    best_error = np.full(len(magnitude), np.inf)
    # From α = 1 down, replacing only on a strictly smaller error: ties keep the larger range.
    fractions = np.linspace(1.0, LOWEST_FRACTION, CANDIDATES)
    rows = max(1, _CHUNK // max(1, weights.shape[1]))
    for first in range(0, len(weights), rows):
        block = weights[first : first + rows]
        block_max = magnitude[first : first + rows]
        for fraction in fractions:
            threshold = block_max * fraction
            # The scale qparams_from_range will compute (float32), guarded for all-zero channels.
            scale = np.maximum(threshold / qmax, 1e-8).astype(np.float32)[:, None]
            restored = np.clip(np.rint(block / scale), -qmax, qmax) * scale
            error = np.sum((block - restored) ** 2, axis=1, dtype=np.float64)
            better = error < best_error[first : first + rows]
            best_error[first : first + rows][better] = error[better]
            best[first : first + rows][better] = threshold[better]
    if spec.axis is None:
        return np.asarray(-best[0]), np.asarray(best[0])
    return -best, best
