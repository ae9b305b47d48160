"""Range methods: the clipping range [lo, hi] of an activation, chosen from its histogram.

All three work on an ``AnchoredHistogram`` (bins of width w starting at 0 on each side; the range
of a quantized tensor always includes 0) and never return a range wider than [min, max]. Which
ends are searched follows the spec:

- symmetric spec: one threshold t on |x| (both sides folded together), range [-t, t];
- asymmetric, all values ≥ 0 (after a Relu) or all ≤ 0: one threshold, range [0, t] or [-t, 0];
- asymmetric with both signs: both ends.

Methods (``t`` runs over bin edges; the last candidate is the exact max, i.e. min/max):

percentile
    hi = the p-th percentile of x, lo = the (100-p)-th (of |x| for symmetric specs), read from the
    cumulative histogram with linear interpolation inside a bin (exact to one bin width).

entropy (TensorRT's calibrator, Migacz 2017, "8-bit Inference with TensorRT")
    For each candidate, P = the histogram inside the range with the clipped counts added to the end
    bins, Q = the same bins merged into the number of quantization levels and spread back evenly over
    the non-empty bins of each level; choose the candidate with the smallest KL(P || Q) (the widest
    on ties). Exact zeros are left out: every range represents them exactly, and a Relu's spike at 0
    would otherwise dominate the divergence and pick a tiny range (NVIDIA's calibrator replaces bin 0
    by bin 1 for the same reason). Both ends: coordinate descent (hi with lo fixed, then lo with hi
    fixed, twice).

mse
    The expected squared error of quantizing the data to the range, with each bin's values uniform
    inside the bin:
        E(lo, hi) = N_in · s² / 12  +  Σ_{bins beyond hi} Σ (x - hi)²  +  Σ_{bins below lo} Σ (x - lo)²
    where s = (hi - lo) / (qmax - qmin) (symmetric: s = t / qmax) and N_in counts the values inside
    the range except exact zeros, which every range represents exactly. The clipping sums use each
    bin's first two moments (mean (a+b)/2, mean square (a² + ab + b²)/3), accumulated from the top,
    so every candidate costs O(1); both ends are searched jointly over all pairs of candidate edges
    (at most 512 per side, evenly spread, always including the max).
"""

from __future__ import annotations

import numpy as np

from qcompile.calibration.histogram import AnchoredHistogram
from qcompile.quant.spec import QuantSpec

# The most candidate thresholds tried on one side (entropy's KL is O(bins) per candidate).
_MAX_CANDIDATES = 512


# -- shared views ------------------------------------------------------------------------------


def _trim(counts: np.ndarray) -> np.ndarray:
    """Counts up to the last non-empty bin."""
    nonzero = np.flatnonzero(counts)
    return counts[: nonzero[-1] + 1] if nonzero.size else counts[:0]


def _side(hist: AnchoredHistogram, which: str, *, without_zeros: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """One side's counts over |x| and the upper edge of each bin (the last clamped to the max).

    ``without_zeros``: leave the exact zeros out of the first bin.
    """
    positive = hist.positive.copy()
    if without_zeros and len(positive):
        positive[0] -= hist.zeros
    if which == "positive":
        counts, top = _trim(positive), hist.max_positive
    elif which == "negative":
        counts, top = _trim(hist.negative), hist.max_negative
    else:  # "folded": |x| over both sides
        counts = _trim(positive + hist.negative)
        top = max(hist.max_positive, hist.max_negative)
    upper = np.arange(1, len(counts) + 1, dtype=np.float64) * hist.width
    if len(upper):
        upper = np.minimum(upper, top)
        upper[-1] = top
    return counts.astype(np.float64), upper


def _mode(hist: AnchoredHistogram, spec: QuantSpec) -> str:
    if spec.symmetric:
        return "folded"
    if hist.max_negative == 0.0:
        return "positive"
    if hist.max_positive == 0.0:
        return "negative"
    return "both"


def _as_range(mode: str, t: float) -> tuple[float, float]:
    if mode == "folded":
        return -t, t
    if mode == "negative":
        return -t, 0.0
    return 0.0, t


def _candidates(first: int, n: int) -> np.ndarray:
    """Bin counts ``first..n`` (inclusive), at most ``_MAX_CANDIDATES`` of them, always with ``n``."""
    if first >= n:
        return np.array([n])
    stride = max(1, -(-(n - first + 1) // _MAX_CANDIDATES))
    picks = np.arange(first, n + 1, stride)
    return picks if picks[-1] == n else np.append(picks, n)


# -- percentile --------------------------------------------------------------------------------


def _quantile(edges: np.ndarray, counts: np.ndarray, q: float) -> float:
    """The value below which a fraction q of the counts lie, interpolating inside a bin."""
    cumulative = np.cumsum(counts)
    target = q * cumulative[-1]
    j = int(np.searchsorted(cumulative, target, side="left"))
    j = min(j, len(counts) - 1)
    below = cumulative[j] - counts[j]
    fraction = 0.0 if counts[j] == 0 else (target - below) / counts[j]
    return float(edges[j] + np.clip(fraction, 0.0, 1.0) * (edges[j + 1] - edges[j]))


def percentile_range(hist: AnchoredHistogram, spec: QuantSpec, percentile: float) -> tuple[float, float]:
    """[lo, hi] at the (100-p)-th and p-th percentiles (of |x| for symmetric specs)."""
    q = percentile / 100.0
    if spec.symmetric:
        counts, upper = _side(hist, "folded")
        if not counts.size:
            return 0.0, 0.0
        t = _quantile(np.concatenate([[0.0], upper]), counts, q)
        return -t, t
    negative, negative_upper = _side(hist, "negative")
    positive, positive_upper = _side(hist, "positive")
    counts = np.concatenate([negative[::-1], positive])
    edges = np.concatenate([-negative_upper[::-1], [0.0], positive_upper])
    return _quantile(edges, counts, 1.0 - q), _quantile(edges, counts, q)


# -- mse ---------------------------------------------------------------------------------------


def _clipping_terms(counts: np.ndarray, upper: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For t = upper[j]: Σ_{i>j} Σ (x - t)² over bin i's values, and the number of those values."""
    lower = np.concatenate([[0.0], upper[:-1]])
    mean = (lower + upper) / 2
    mean_square = (lower * lower + lower * upper + upper * upper) / 3

    def above(values: np.ndarray) -> np.ndarray:  # Σ over bins strictly above j
        suffix = np.cumsum(values[::-1])[::-1]
        return np.concatenate([suffix[1:], [0.0]])

    s0, s1, s2 = above(counts), above(counts * mean), above(counts * mean_square)
    return s2 - 2 * upper * s1 + upper * upper * s0, s0


def mse_range(hist: AnchoredHistogram, spec: QuantSpec) -> tuple[float, float]:
    """[lo, hi] minimizing the expected squared quantization error (module docstring)."""
    mode = _mode(hist, spec)
    steps = spec.dtype.qmax if spec.symmetric else spec.dtype.qmax - spec.dtype.qmin
    inside = hist.total - hist.zeros  # exact zeros: no rounding error in any range
    if mode != "both":
        counts, upper = _side(hist, mode)
        if not counts.size:
            return 0.0, 0.0
        clip, clipped = _clipping_terms(counts, upper)
        error = (inside - clipped) * (upper / steps) ** 2 / 12 + clip
        return _as_range(mode, float(upper[int(np.argmin(error))]))
    negative, negative_upper = _side(hist, "negative")
    positive, positive_upper = _side(hist, "positive")
    clip_n, clipped_n = _clipping_terms(negative, negative_upper)
    clip_p, clipped_p = _clipping_terms(positive, positive_upper)
    rows = _candidates(1, len(negative)) - 1
    cols = _candidates(1, len(positive)) - 1
    span = negative_upper[rows, None] + positive_upper[None, cols]
    n_in = inside - clipped_n[rows, None] - clipped_p[None, cols]
    error = n_in * (span / steps) ** 2 / 12 + clip_n[rows, None] + clip_p[None, cols]
    i, j = np.unravel_index(int(np.argmin(error)), error.shape)
    return -float(negative_upper[rows[i]]), float(positive_upper[cols[j]])


# -- entropy -----------------------------------------------------------------------------------


def _kl_divergence(counts: np.ndarray, start: int, stop: int, levels: int) -> float:
    """KL(P || Q) for the range of bins [start, stop) of ``counts`` quantized into ``levels``."""
    inside = counts[start:stop]
    p = inside.copy()
    p[0] += counts[:start].sum()
    p[-1] += counts[stop:].sum()
    n = stop - start
    level = (np.arange(n) * levels) // n
    nonempty = inside > 0
    level_sum = np.bincount(level, weights=inside, minlength=levels)
    level_bins = np.bincount(level, weights=nonempty, minlength=levels)
    q = np.where(nonempty, level_sum[level] / np.maximum(level_bins[level], 1), 0.0)
    p_total, q_total = p.sum(), q.sum()
    if p_total == 0 or q_total == 0:
        return np.inf
    p, q = p / p_total, q / q_total
    mask = p > 0
    # An end bin that is empty inside the range but receives the clipped counts has q = 0:
    # smooth it as TensorRT does, so the candidate is penalised instead of excluded.
    q = np.where(mask & (q == 0), 1e-9, q)
    return float(np.sum(p[mask] * np.log(p[mask] / q[mask])))


def _last_argmin(values: list[float]) -> int:
    """Index of the smallest value, the last one on ties (the widest range, as NVIDIA's calibrator)."""
    values_array = np.asarray(values)
    return len(values_array) - 1 - int(np.argmin(values_array[::-1]))


def _best_stop(counts: np.ndarray, start: int, stops: np.ndarray, levels: int) -> int:
    divergences = [_kl_divergence(counts, start, int(stop), levels) for stop in stops]
    return int(stops[_last_argmin(divergences)])


def entropy_range(hist: AnchoredHistogram, spec: QuantSpec) -> tuple[float, float]:
    """[lo, hi] minimizing KL(P || Q) between the float and quantized histograms (module docstring)."""
    mode = _mode(hist, spec)
    if mode != "both":
        counts, upper = _side(hist, mode, without_zeros=True)
        if not counts.size:
            return 0.0, 0.0
        # Levels on |x|: 128 for int8 symmetric (0..127), 256 for uint8 over [0, t].
        levels = spec.dtype.qmax + 1 if spec.symmetric else spec.dtype.qmax - spec.dtype.qmin + 1
        stop = _best_stop(counts, 0, _candidates(levels, len(counts)), levels)
        return _as_range(mode, float(upper[stop - 1]))
    negative, negative_upper = _side(hist, "negative")
    positive, positive_upper = _side(hist, "positive", without_zeros=True)
    levels = spec.dtype.qmax - spec.dtype.qmin + 1
    counts = np.concatenate([negative[::-1], positive])
    zero = len(negative)  # counts[zero] is the first bin at or above 0
    start, stop = 0, len(counts)
    for _ in range(2):
        # Keep at least ``levels`` bins inside, as TensorRT starts at 128 bins.
        stop = _best_stop(counts, start, _candidates(max(zero + 1, start + levels), len(counts)), levels)
        firsts = zero - (_candidates(max(1, levels - (stop - zero)), zero)) if zero else np.array([0])
        firsts = firsts[firsts >= 0]
        divergences = [_kl_divergence(counts, int(first), stop, levels) for first in firsts]
        start = int(firsts[int(np.argmin(divergences))])  # firsts run from the widest: first minimum
    lo = -float(negative_upper[zero - start - 1]) if start < zero else 0.0
    hi = float(positive_upper[stop - zero - 1]) if stop > zero else 0.0
    return lo, hi
