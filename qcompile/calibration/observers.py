"""Observers: streaming range statistics of one tensor, turned into qparams at the end.

The contract (``Observer``): ``update(array)`` is called once per calibration batch with that
batch's values of the tensor (several tensors that share qparams may feed one observer);
``qparams()`` is called after the last batch. An observer keeps a bounded state (O(channels) for
min/max; a histogram of at most ``bins`` counts for the percentile / entropy / MSE methods), never
the arrays, so calibration memory does not grow with the number of batches.

MinMax: the range is [min x, max x] over every value seen, exactly; it does not depend on how the
data was split into batches. ``qparams_from_range`` then widens it to include 0.

Percentile / entropy / MSE: a ``Histogram`` (``calibration/histogram.py``: a power-of-two grid
anchored at 0, identical whatever the batch split and order) and a range method
(``calibration/range_methods.py``) that picks the clipping range from it.

``make_observer`` is the one place that maps ``CalibrationOptions.method`` to an observer.
"""

from __future__ import annotations

import abc

import numpy as np

from qcompile.calibration import range_methods
from qcompile.calibration.histogram import Histogram
from qcompile.errors import InvalidDataError, UsageError
from qcompile.options import CalibrationMethod, CalibrationOptions
from qcompile.quant.qparams import QParams, qparams_from_range
from qcompile.quant.spec import QuantSpec


class Observer(abc.ABC):
    """Watches the values of one tensor (or one group sharing qparams) across batches.

    ``name`` is only for messages ("no calibration data reached tensor 'x'").
    """

    def __init__(self, spec: QuantSpec, name: str = "") -> None:
        self.spec = spec
        self.name = name

    @abc.abstractmethod
    def update(self, array: np.ndarray) -> None:
        """Fold one batch of values into the state; the array is not kept."""

    @abc.abstractmethod
    def qparams(self) -> QParams:
        """Scale and zero point from everything seen; InvalidDataError if nothing was seen."""

    def _no_data(self) -> InvalidDataError:
        return InvalidDataError(f"no calibration data reached tensor {self.name!r}")

    def _check_finite(self, lo: np.ndarray, hi: np.ndarray) -> None:
        """Raise if a batch's min/max (which NaN and Inf propagate to) is not finite."""
        if np.isnan(lo).any() or np.isnan(hi).any():
            raise InvalidDataError(f"tensor {self.name!r} contains NaN on the calibration data")
        if not (np.isfinite(lo).all() and np.isfinite(hi).all()):
            # An infinite range has no finite scale; models that mask with -inf need that op kept float.
            raise InvalidDataError(f"tensor {self.name!r} contains Inf on the calibration data")


class MinMaxObserver(Observer):
    """Per-tensor running min and max."""

    def __init__(self, spec: QuantSpec, name: str = "") -> None:
        if spec.axis is not None:
            raise ValueError("MinMaxObserver is per tensor; use PerChannelMinMaxObserver for an axis")
        super().__init__(spec, name)
        self._lo: float | None = None
        self._hi: float | None = None

    def update(self, array: np.ndarray) -> None:
        array = np.asarray(array)
        if array.size == 0:  # e.g. the output of NonZero on an all-zero batch: nothing to see
            return
        lo, hi = np.float64(array.min()), np.float64(array.max())
        self._check_finite(lo, hi)
        self._lo = lo if self._lo is None else min(self._lo, lo)
        self._hi = hi if self._hi is None else max(self._hi, hi)

    def qparams(self) -> QParams:
        if self._lo is None or self._hi is None:
            raise self._no_data()
        return qparams_from_range(np.float64(self._lo), np.float64(self._hi), self.spec)


class PerChannelMinMaxObserver(Observer):
    """Running min and max of each slice along ``spec.axis`` (weights, per-channel activations)."""

    def __init__(self, spec: QuantSpec, name: str = "") -> None:
        if spec.axis is None:
            raise ValueError("PerChannelMinMaxObserver needs a spec with an axis")
        super().__init__(spec, name)
        self._lo: np.ndarray | None = None
        self._hi: np.ndarray | None = None

    def update(self, array: np.ndarray) -> None:
        array = np.asarray(array)
        if array.size == 0:
            return
        if not -array.ndim <= self.spec.axis < array.ndim:
            raise InvalidDataError(
                f"tensor {self.name!r} has rank {array.ndim}, too low for channel axis {self.spec.axis}"
            )
        axis = self.spec.axis % array.ndim
        others = tuple(i for i in range(array.ndim) if i != axis)
        # Reducing over the other axes in place avoids the copy a moveaxis + reshape would make.
        lo = array.min(axis=others).astype(np.float64)
        hi = array.max(axis=others).astype(np.float64)
        self._check_finite(lo, hi)
        if self._lo is None or self._hi is None:
            self._lo, self._hi = lo, hi
            return
        if lo.shape != self._lo.shape:
            raise InvalidDataError(
                f"tensor {self.name!r} has {lo.shape[0]} channels on axis {axis} in one batch "
                f"and {self._lo.shape[0]} in another"
            )
        np.minimum(self._lo, lo, out=self._lo)
        np.maximum(self._hi, hi, out=self._hi)

    def qparams(self) -> QParams:
        if self._lo is None or self._hi is None:
            raise self._no_data()
        return qparams_from_range(self._lo, self._hi, self.spec)


class HistogramObserver(Observer):
    """Streams values into a ``Histogram``; a subclass picks the range from it (``choose_range``)."""

    def __init__(self, spec: QuantSpec, name: str = "", *, bins: int = 2048) -> None:
        if spec.axis is not None:
            raise ValueError(f"{type(self).__name__} is per tensor; histogram methods have no per-channel form")
        super().__init__(spec, name)
        self.histogram = Histogram(bins)

    def update(self, array: np.ndarray) -> None:
        array = np.asarray(array)
        if array.size == 0:
            return
        lo, hi = np.float64(array.min()), np.float64(array.max())
        self._check_finite(lo, hi)
        self.histogram.update(array, (float(lo), float(hi)))

    @abc.abstractmethod
    def choose_range(self) -> tuple[float, float]:
        """The clipping range [lo, hi] from the histogram."""

    def qparams(self) -> QParams:
        if self.histogram.empty:
            raise self._no_data()
        lo, hi = self.choose_range()
        return qparams_from_range(np.float64(lo), np.float64(hi), self.spec)


class PercentileObserver(HistogramObserver):
    """Range at the (100-p)-th and p-th percentiles (of |x| for symmetric specs)."""

    def __init__(self, spec: QuantSpec, name: str = "", *, bins: int = 2048, percentile: float = 99.99) -> None:
        super().__init__(spec, name, bins=bins)
        self.percentile = percentile

    def choose_range(self) -> tuple[float, float]:
        return range_methods.percentile_range(self.histogram.anchored(), self.spec, self.percentile)


class EntropyObserver(HistogramObserver):
    """Range minimizing KL divergence between the float and quantized histograms (TensorRT)."""

    def choose_range(self) -> tuple[float, float]:
        return range_methods.entropy_range(self.histogram.anchored(), self.spec)


class MSEObserver(HistogramObserver):
    """Range minimizing the expected squared quantization error, clipping included."""

    def choose_range(self) -> tuple[float, float]:
        return range_methods.mse_range(self.histogram.anchored(), self.spec)


def make_observer(spec: QuantSpec, options: CalibrationOptions, name: str = "") -> Observer:
    """The observer for ``options.method`` (per channel: min/max only)."""
    method = options.method
    if spec.axis is not None:
        if method != CalibrationMethod.MINMAX:
            raise UsageError(f"calibration method {method.value} is per tensor; tensor {name!r} is per channel")
        return PerChannelMinMaxObserver(spec, name)
    if method == CalibrationMethod.MINMAX:
        return MinMaxObserver(spec, name)
    if method == CalibrationMethod.PERCENTILE:
        return PercentileObserver(spec, name, bins=options.bins, percentile=options.percentile)
    if method == CalibrationMethod.ENTROPY:
        return EntropyObserver(spec, name, bins=options.bins)
    if method == CalibrationMethod.MSE:
        return MSEObserver(spec, name, bins=options.bins)
    raise AssertionError(f"unhandled calibration method {method}")
