"""The streaming histogram: the same edges and counts whatever the batch split, order and shapes;
exact counts on a power-of-two grid anchored at 0; state bounded by the number of bins."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from qcompile.calibration.histogram import Histogram
from qcompile.calibration.observers import EntropyObserver, MSEObserver, PercentileObserver
from qcompile.errors import InvalidDataError
from qcompile.quant.spec import QuantDType, QuantSpec

U8 = QuantSpec(QuantDType.UINT8, symmetric=False)


def values(seed: int = 0) -> np.ndarray:
    """Heavy-tailed values of both signs with exact zeros, whose range grows across the array."""
    rng = np.random.default_rng(seed)
    parts = [
        rng.normal(scale=0.01, size=300),  # a tiny range first: the grid starts fine and must coarsen
        np.zeros(200),
        rng.laplace(scale=1.0, size=3000),
        np.maximum(rng.normal(size=2000), 0.0),
        np.array([37.5, -12.25]),
    ]
    return np.concatenate(parts).astype(np.float32)


def stream(batches, bins: int = 256) -> Histogram:
    histogram = Histogram(bins)
    for batch in batches:
        histogram.update(batch)
    return histogram


def test_same_histogram_whatever_the_split_order_and_batch_shapes():
    data = values()
    rng = np.random.default_rng(1)
    shuffled = rng.permutation(data)
    runs = [
        stream([data]),
        stream(np.split(data, [1, 7, 300, 301, 2500])),  # in order: the range grows batch by batch
        stream(np.array_split(shuffled, 37)),
        stream(np.array_split(data[::-1], 5)),  # the widest values first
        # Batches of other ranks, as activations of different layers come.
        stream([shuffled[:2400].reshape(2, 3, 20, 20), shuffled[2400:5400].reshape(100, 30), shuffled[5400:]]),
    ]
    first = runs[0]
    for other in runs[1:]:
        np.testing.assert_array_equal(other.edges, first.edges)
        np.testing.assert_array_equal(other.counts, first.counts)
        assert (other.exponent, other.offset, other.zeros, other.min, other.max) == (
            first.exponent, first.offset, first.zeros, first.min, first.max
        )
    assert first.total == data.size and first.zeros == int(np.count_nonzero(data == 0))


def test_counts_are_exact_on_a_power_of_two_grid_anchored_at_zero():
    data = values(2)
    histogram = stream(np.array_split(data, 9), bins=300)
    width = histogram.width
    assert width == 2.0 ** histogram.exponent
    edges = histogram.edges
    np.testing.assert_array_equal(edges / width, np.round(edges / width))  # every edge a multiple of w
    assert edges[0] <= data.min() and data.max() < edges[-1] and len(histogram.counts) <= 300
    # Each value counted in the bin [edges[i], edges[i+1]) that holds it.
    direct = np.bincount(np.searchsorted(edges, data.astype(np.float64), side="right") - 1, minlength=len(edges) - 1)
    np.testing.assert_array_equal(histogram.counts, direct)
    # The width is the smallest that fits: half of it would need more than ``bins`` bins.
    half = width / 2
    assert np.floor(data.max() / half) - np.floor(data.min() / half) + 1 > 300


@pytest.mark.parametrize(
    "data",
    [np.zeros(50), np.full(7, 3.25), -np.abs(np.random.default_rng(3).normal(size=500)), np.array([1e-30, 2e30])],
    ids=["zeros", "constant", "negative", "wide"],
)
def test_edge_cases_keep_every_value(data):
    histogram = stream([data.astype(np.float32)])
    assert histogram.total == data.size
    assert histogram.edges[0] <= data.astype(np.float32).min() and data.astype(np.float32).max() < histogram.edges[-1]
    anchored = histogram.anchored()
    assert anchored.total == data.size and len(anchored.positive) <= histogram.bins


def test_anchored_view_splits_the_signs_on_the_same_grid():
    data = values(4)
    histogram = stream([data], bins=512)
    anchored = histogram.anchored()
    w = anchored.width
    positive = data[data >= 0].astype(np.float64)
    negative = -data[data < 0].astype(np.float64)
    np.testing.assert_array_equal(anchored.positive, np.bincount(np.floor(positive / w).astype(int), minlength=len(anchored.positive)))
    # A negative value x sits in |x| bin ceil(|x|/w) - 1.
    np.testing.assert_array_equal(anchored.negative, np.bincount(np.ceil(negative / w).astype(int) - 1, minlength=len(anchored.negative)))
    assert (anchored.max_positive, anchored.max_negative) == (float(data.max()), float(-data.min()))
    assert anchored.zeros == int(np.count_nonzero(data == 0))


def test_data_far_from_zero_is_merged_to_fit():
    data = np.random.default_rng(5).uniform(100.0, 101.0, size=1000).astype(np.float32)
    anchored = stream([data]).anchored()
    assert len(anchored.positive) <= 256 and anchored.total == 1000 and anchored.negative.sum() == 0


@pytest.mark.parametrize("cls", [PercentileObserver, EntropyObserver, MSEObserver])
def test_observer_state_does_not_grow_with_the_number_of_batches(cls):
    rng = np.random.default_rng(6)
    observer = cls(U8, "x", bins=512)
    first = rng.normal(size=(8, 16)).astype(np.float32)
    first[0, :2] = [-6.0, 6.0]  # the overall range arrives first, so the grid is final after one batch
    observer.update(first)
    size_after_one = len(pickle.dumps(observer))
    for _ in range(200):
        observer.update(np.clip(rng.normal(size=(8, 16)), -5, 5).astype(np.float32))
    assert len(pickle.dumps(observer)) == size_after_one
    assert observer.histogram.total == 201 * 128
    # Whatever the data, the state is the counts (at most ``bins``) and a few numbers.
    observer.update(rng.laplace(scale=1e3, size=(64, 64)).astype(np.float32))
    assert len(observer.histogram.counts) <= 512 and len(pickle.dumps(observer)) < 512 * 8 + 2048


@pytest.mark.parametrize("bad, word", [(np.nan, "NaN"), (np.inf, "Inf")])
def test_histogram_observers_refuse_nan_and_inf(bad, word):
    array = np.zeros((2, 3), np.float32)
    array[1, 2] = bad
    with pytest.raises(InvalidDataError, match=f"tensor 'x' contains {word}"):
        MSEObserver(U8, "x").update(array)


def test_histogram_observer_without_data_and_per_channel_spec():
    observer = EntropyObserver(U8, "y")
    observer.update(np.zeros((0, 4), np.float32))
    with pytest.raises(InvalidDataError, match="no calibration data reached tensor 'y'"):
        observer.qparams()
    with pytest.raises(ValueError, match="per tensor"):
        PercentileObserver(QuantSpec("int8", True, axis=0), "w")
