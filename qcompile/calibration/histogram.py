"""A streaming histogram whose result depends only on the multiset of values seen.

The grid: bin ``k`` holds the values x with ``floor(x / w) == k``, where the width ``w = 2**e`` is
a power of two. Edges are therefore multiples of ``w`` and 0 is always an edge (the grid is
anchored at 0, so a Relu output's exact zeros sit in bin 0 and ``[0, t]`` ranges fall on edges).

The width: the smallest ``e`` (not below ``MIN_EXPONENT``) for which the occupied bins
``floor(min/w) .. floor(max/w)`` number at most ``bins`` and ``max|x| / w`` stays below 2**52
(so bin indices are exact integers). When a batch needs a wider grid, ``e`` grows by ``m`` and
bin ``k`` merges into bin ``k >> m`` — exact, because dividing by a power of two is exact in
floating point and ``floor(floor(x/w) / 2**m) == floor(x / (2**m w))``.

Why the result does not depend on batch split or order: the "fits" condition is monotone both in
``e`` (doubling never adds occupied bins) and in the data (more values never need fewer bins).
So the width after each batch is the smallest that fits everything seen so far — a function of
the overall min and max only — and the counts are the exact counts of ``floor(x / w)`` at that
width. Two calibrations over the same values, split or shuffled differently, end with identical
edges and counts (``tests/calibration/test_histogram.py``).

Memory is O(bins) plus one batch's temporaries (processed in chunks); the arrays are not kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# The finest grid, 2**-1000: any float32 value has an exact bin index, and the width is a normal float64.
MIN_EXPONENT = -1000
# Bin indices stay below 2**52 in magnitude so float64 → int64 is exact.
_MAX_INDEX_BITS = 52
# Values per chunk when binning a batch: bounds the float64/int64 temporaries (8 MiB each).
_CHUNK = 1 << 20


@dataclass(frozen=True)
class AnchoredHistogram:
    """Both sides of a histogram whose bins start at 0, as counts over |x| bins of width ``width``.

    ``positive[j]`` counts values in ``[j·w, (j+1)·w)``; ``negative[j]`` counts values in
    ``[-(j+1)·w, -j·w)``. Both arrays have the same length ``n`` (zero-padded), and ``n·w`` may
    exceed the data: ``max_positive`` / ``max_negative`` are the exact largest magnitudes seen on
    each side (0 when a side is empty). ``zeros`` counts the exact zeros (inside ``positive[0]``).
    """

    width: float
    positive: np.ndarray  # int64 (n,)
    negative: np.ndarray  # int64 (n,)
    max_positive: float
    max_negative: float
    zeros: int

    @property
    def total(self) -> int:
        return int(self.positive.sum() + self.negative.sum())


class Histogram:
    """Counts of ``floor(x / 2**e)`` over every value seen; see the module docstring."""

    def __init__(self, bins: int = 2048) -> None:
        if bins < 2:
            raise ValueError(f"a histogram needs at least 2 bins, got {bins}")
        self.bins = bins
        self.exponent: int | None = None  # None until a non-empty batch arrives
        self.offset = 0  # bin index of counts[0]
        self.counts = np.zeros(0, dtype=np.int64)
        self.zeros = 0
        self.min = 0.0
        self.max = 0.0

    # -- state ---------------------------------------------------------------------------------

    @property
    def empty(self) -> bool:
        return self.exponent is None

    @property
    def width(self) -> float:
        if self.exponent is None:
            raise ValueError("the histogram is empty")
        return float(np.ldexp(1.0, self.exponent))

    @property
    def edges(self) -> np.ndarray:
        """``len(counts) + 1`` edges, multiples of the width."""
        return (self.offset + np.arange(len(self.counts) + 1, dtype=np.float64)) * self.width

    @property
    def total(self) -> int:
        return int(self.counts.sum())

    # -- update --------------------------------------------------------------------------------

    def _fits(self, exponent: int, lo: float, hi: float) -> bool:
        width = np.ldexp(1.0, exponent)
        if max(abs(lo), abs(hi)) / width >= 2.0**_MAX_INDEX_BITS:
            return False
        return np.floor(hi / width) - np.floor(lo / width) + 1 <= self.bins

    def _smallest_exponent(self, lo: float, hi: float) -> int:
        """The smallest exponent, not below the current one, whose grid holds [lo, hi]."""
        start = MIN_EXPONENT if self.exponent is None else self.exponent
        # Lower bounds that skip exponents which cannot fit: n ≥ (hi - lo) / w and |x| / w < 2**52.
        # One below each bound guards against rounding in log2; the loop checks exactly.
        if hi > lo:
            start = max(start, int(np.floor(np.log2((hi - lo) / self.bins))) - 1)
        magnitude = max(abs(lo), abs(hi))
        if magnitude > 0:
            start = max(start, int(np.floor(np.log2(magnitude))) - _MAX_INDEX_BITS - 1)
        exponent = start
        while not self._fits(exponent, lo, hi):
            exponent += 1
        return exponent

    def _regrid(self, exponent: int, lo: float, hi: float) -> None:
        """Move the counts to the grid of ``exponent`` covering [lo, hi] (merging 2**m bins into one)."""
        width = np.ldexp(1.0, exponent)
        new_offset = int(np.floor(lo / width))
        new_counts = np.zeros(int(np.floor(hi / width)) - new_offset + 1, dtype=np.int64)
        if self.exponent is not None and len(self.counts):
            shift = min(exponent - self.exponent, 63)  # an arithmetic shift by 63 gives 0 or -1: still floor
            old = self.offset + np.arange(len(self.counts), dtype=np.int64)
            np.add.at(new_counts, np.right_shift(old, shift) - new_offset, self.counts)
        self.exponent, self.offset, self.counts = exponent, new_offset, new_counts

    def update(self, array: np.ndarray, bounds: tuple[float, float] | None = None) -> None:
        """Add every value of ``array`` (any shape; finite values only — the caller checks).

        ``bounds``: the array's (min, max) when the caller has them already.
        """
        flat = np.asarray(array).reshape(-1)
        if flat.size == 0:
            return
        lo, hi = bounds if bounds is not None else (float(flat.min()), float(flat.max()))
        if not self.empty:
            lo, hi = min(lo, self.min), max(hi, self.max)
        exponent = self._smallest_exponent(lo, hi)
        width = np.ldexp(1.0, exponent)
        first, last = int(np.floor(lo / width)), int(np.floor(hi / width))
        if exponent != self.exponent or first != self.offset or last != self.offset + len(self.counts) - 1:
            self._regrid(exponent, lo, hi)
        self.min, self.max = lo, hi
        inverse = np.ldexp(1.0, -exponent)  # multiplying by a power of two is exact
        for start in range(0, flat.size, _CHUNK):
            chunk = flat[start : start + _CHUNK].astype(np.float64)
            self.zeros += int(np.count_nonzero(chunk == 0))
            index = np.floor(chunk * inverse).astype(np.int64)
            index -= self.offset
            self.counts += np.bincount(index, minlength=len(self.counts))

    # -- views ---------------------------------------------------------------------------------

    def anchored(self) -> AnchoredHistogram:
        """Both sides as |x| histograms starting at 0 (see ``AnchoredHistogram``), ≤ ``bins`` long.

        The range of a quantized tensor always includes 0, so the range methods work on bins that
        start at 0. Data far from 0 (all values in [100, 101]) would need many empty bins between 0
        and the data: pairs of bins are merged (exactly, on the grid) until each side fits.
        """
        if self.empty:
            raise ValueError("the histogram is empty")
        index = self.offset + np.arange(len(self.counts), dtype=np.int64)
        exponent = self.exponent
        assert exponent is not None
        # x in [k·w, (k+1)·w) with k < 0 has |x| in (-(k+1)·w, -k·w]: |x| bin -k-1 (ties at edges
        # go to the lower bin, which has no effect on counts of a continuous distribution).
        positive_index = index[index >= 0]
        negative_index = -index[index < 0] - 1
        positive_counts = self.counts[index >= 0]
        negative_counts = self.counts[index < 0]
        top = max(int(positive_index.max(initial=-1)), int(negative_index.max(initial=-1)))
        shift = 0
        while (top >> shift) + 1 > self.bins:
            shift += 1
        length = (top >> shift) + 1
        positive = np.zeros(length, dtype=np.int64)
        negative = np.zeros(length, dtype=np.int64)
        np.add.at(positive, positive_index >> shift, positive_counts)
        np.add.at(negative, negative_index >> shift, negative_counts)
        return AnchoredHistogram(
            width=float(np.ldexp(1.0, exponent + shift)),
            positive=positive,
            negative=negative,
            max_positive=max(self.max, 0.0),
            max_negative=max(-self.min, 0.0),
            zeros=self.zeros,
        )
