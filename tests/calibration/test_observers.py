"""Observers: streamed min/max equals the min/max of all data, per tensor and per channel."""

from __future__ import annotations

import pickle

import numpy as np
import pytest

from qcompile.calibration.observers import MinMaxObserver, Observer, PerChannelMinMaxObserver
from qcompile.errors import InvalidDataError
from qcompile.quant.qparams import QParams, dequantize, qparams_from_range, quantize
from qcompile.quant.spec import QuantDType, QuantSpec

U8 = QuantSpec(QuantDType.UINT8, symmetric=False)
S8 = QuantSpec(QuantDType.INT8, symmetric=True)


def batches(seed: int, n: int, shape: tuple[int, ...]) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    # Different offsets per batch, so no single batch holds the overall extremes.
    return [(rng.standard_normal(shape) * (i + 1) + i - n / 2).astype(np.float32) for i in range(n)]


def assert_same_qparams(a: QParams, b: QParams) -> None:
    np.testing.assert_array_equal(a.scale, b.scale)
    np.testing.assert_array_equal(a.zero_point, b.zero_point)
    assert a.spec == b.spec


@pytest.mark.parametrize("spec", [U8, S8])
def test_minmax_over_batches_equals_minmax_of_the_concatenation(spec):
    data = batches(0, 5, (4, 3, 6))
    everything = np.concatenate(data)
    observer = MinMaxObserver(spec, "x")
    for batch in data:
        observer.update(batch)
    assert_same_qparams(observer.qparams(), qparams_from_range(everything.min(), everything.max(), spec))
    # The scale encodes the range: asymmetric spans hi - lo over 255 steps, symmetric max|x| over 127.
    lo, hi = min(0.0, float(everything.min())), max(0.0, float(everything.max()))
    expected = (hi - lo) / 255 if not spec.symmetric else max(-lo, hi) / 127
    assert observer.qparams().scale == pytest.approx(expected, rel=1e-6)


def test_minmax_does_not_depend_on_the_batch_split():
    everything = np.concatenate(batches(1, 6, (5, 7)))
    results = []
    for cuts in ([], [1], [3, 4, 29], list(range(1, 30))):
        observer = MinMaxObserver(U8, "x")
        for part in np.split(everything, cuts):
            observer.update(part)
        results.append(observer.qparams())
    for other in results[1:]:
        assert_same_qparams(results[0], other)


@pytest.mark.parametrize("axis", [0, 1, -1])
def test_per_channel_minmax_along_an_axis(axis):
    data = batches(2, 4, (3, 5, 6))
    # Batches stack on an axis other than the channel axis, as batches of activations do.
    everything = np.concatenate(data, axis=1 if axis == 0 else 0)
    spec = QuantSpec(QuantDType.INT8, symmetric=True, axis=axis)
    observer = PerChannelMinMaxObserver(spec, "w")
    for batch in data:
        observer.update(batch)
    others = tuple(i for i in range(3) if i != axis % 3)
    lo, hi = everything.min(axis=others), everything.max(axis=others)
    qp = observer.qparams()
    assert qp.scale.shape == (everything.shape[axis],)
    np.testing.assert_allclose(qp.scale, np.maximum(np.abs(lo), np.abs(hi)) / 127, rtol=1e-6)
    assert_same_qparams(qp, qparams_from_range(lo, hi, spec))


@pytest.mark.parametrize(
    "spec", [U8, S8, QuantSpec("int8", symmetric=True, axis=1), QuantSpec("uint8", symmetric=False, axis=0)]
)
def test_round_trip_error_is_at_most_half_a_step_inside_the_range(spec):
    data = batches(3, 3, (4, 8, 5))
    observer = MinMaxObserver(spec, "x") if spec.axis is None else PerChannelMinMaxObserver(spec, "x")
    for batch in data:
        observer.update(batch)
    qp = observer.qparams()
    for batch in data:
        error = np.abs(dequantize(quantize(batch, qp), qp) - batch)
        shape = [1] * batch.ndim
        if spec.axis is not None:
            shape[spec.axis] = -1
        bound = qp.scale.reshape(shape) / 2 * (1 + 1e-5) + 1e-7
        assert np.all(error <= bound)


def test_qparams_before_any_data():
    for observer in (MinMaxObserver(U8, "conv_out"), PerChannelMinMaxObserver(QuantSpec("int8", True, axis=0), "w")):
        with pytest.raises(InvalidDataError, match="no calibration data reached tensor 'conv_out'|tensor 'w'"):
            observer.qparams()
    observer = MinMaxObserver(U8, "y")
    observer.update(np.zeros((0, 3), np.float32))  # an empty batch adds nothing
    with pytest.raises(InvalidDataError, match="no calibration data reached tensor 'y'"):
        observer.qparams()


@pytest.mark.parametrize("bad, word", [(np.nan, "NaN"), (np.inf, "Inf"), (-np.inf, "Inf")])
def test_nan_and_inf_are_data_errors(bad, word):
    array = np.zeros((2, 3), np.float32)
    array[1, 1] = bad
    for observer in (MinMaxObserver(U8, "x"), PerChannelMinMaxObserver(QuantSpec("int8", True, axis=1), "x")):
        with pytest.raises(InvalidDataError, match=f"tensor 'x' contains {word}"):
            observer.update(array)


def test_channel_count_must_not_change():
    observer = PerChannelMinMaxObserver(QuantSpec("int8", True, axis=1), "x")
    observer.update(np.ones((2, 4), np.float32))
    with pytest.raises(InvalidDataError, match="5 channels on axis 1 in one batch and 4 in another"):
        observer.update(np.ones((2, 5), np.float32))


def test_spec_granularity_must_match_the_observer():
    with pytest.raises(ValueError, match="per tensor"):
        MinMaxObserver(QuantSpec("int8", True, axis=0))
    with pytest.raises(ValueError, match="needs a spec with an axis"):
        PerChannelMinMaxObserver(S8)


def test_state_does_not_grow_with_the_data():
    for observer in (MinMaxObserver(U8, "x"), PerChannelMinMaxObserver(QuantSpec("int8", True, axis=1), "x")):
        data = batches(4, 40, (16, 8))
        observer.update(data[0])
        size_after_one = len(pickle.dumps(observer))
        for batch in data[1:]:
            observer.update(batch)
        assert len(pickle.dumps(observer)) == size_after_one


def test_the_contract_is_two_abstract_methods():
    with pytest.raises(TypeError):
        Observer(U8)  # abstract

    class Fixed(Observer):
        def update(self, array: np.ndarray) -> None:
            pass

        def qparams(self) -> QParams:
            return qparams_from_range(np.float64(-1), np.float64(1), self.spec)

    qp = Fixed(U8).qparams()
    assert isinstance(qp, QParams) and qp.scale == pytest.approx(2 / 255)
