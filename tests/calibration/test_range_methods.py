"""Range methods (percentile, entropy, mse) on histograms, the observer factory, and the weight MSE search."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx_ir.passes.common import ShapeInferencePass

import qcompile
from qcompile.calibration.histogram import Histogram
from qcompile.calibration.observers import (
    EntropyObserver,
    MinMaxObserver,
    MSEObserver,
    PercentileObserver,
    PerChannelMinMaxObserver,
    make_observer,
)
from qcompile.calibration.range_methods import entropy_range, mse_range, percentile_range
from qcompile.errors import UsageError
from qcompile.options import CalibrationMethod, CalibrationOptions, WeightMethod
from qcompile.passes import AnnotatePass, AssignQParamsPass
from qcompile.passes.insert_observers import group_specs
from qcompile.quant.qparams import QParams, dequantize, qparams_from_range, quantize
from qcompile.quant.spec import QPARAMS_KEY, QuantDType, QuantSpec
from qcompile.quant.weight_range import mse_weight_range
from tests.helpers import run, sqnr_db, to_proto
from tests.passes.test_annotate import conv_relu_pool_gemm

U8 = QuantSpec(QuantDType.UINT8, symmetric=False)
S8 = QuantSpec(QuantDType.INT8, symmetric=True)
I8_ASYMMETRIC = QuantSpec(QuantDType.INT8, symmetric=False)


def anchored(data: np.ndarray, bins: int = 2048):
    histogram = Histogram(bins)
    histogram.update(data)
    return histogram.anchored()


def quantization_mse(data: np.ndarray, qp: QParams) -> float:
    return float(np.mean((dequantize(quantize(data, qp), qp).astype(np.float64) - data) ** 2))


def heavy_tailed(seed: int = 0, n: int = 200_000) -> np.ndarray:
    """Laplace values and two outliers: min/max is set by a handful of values.

    (Outliers far out, or many of them, make clipping cost more squared error than it saves: the
    MSE method then rightly keeps them. Clipping pays when the extremes are this rare.)
    """
    rng = np.random.default_rng(seed)
    data = rng.laplace(size=n)
    data[:2] = [20.0, -16.0]
    return data.astype(np.float32)


@pytest.mark.parametrize("percentile", [99.0, 99.9, 99.99])
def test_percentile_matches_numpy_within_a_bin_width(percentile):
    data = heavy_tailed(1)
    hist = anchored(data)
    lo, hi = percentile_range(hist, U8, percentile)
    expected_lo, expected_hi = np.percentile(data, [100 - percentile, percentile])
    assert abs(lo - expected_lo) <= hist.width and abs(hi - expected_hi) <= hist.width
    # Symmetric specs: the percentile of |x|, as one threshold.
    lo, hi = percentile_range(hist, S8, percentile)
    assert lo == -hi and abs(hi - np.percentile(np.abs(data), percentile)) <= hist.width
    assert percentile_range(hist, U8, 100.0) == (float(data.min()), float(data.max()))


@pytest.mark.parametrize("spec", [U8, S8], ids=["uint8", "int8-symmetric"])
@pytest.mark.parametrize("method", [entropy_range, mse_range], ids=["entropy", "mse"])
def test_entropy_and_mse_clip_heavy_tails_and_lower_the_error(method, spec):
    data = heavy_tailed(2)
    lo, hi = method(anchored(data), spec)
    assert data.min() < lo < 0 < hi < data.max()  # both ends clipped (the symmetric one at |x|)
    chosen = quantization_mse(data, qparams_from_range(np.float64(lo), np.float64(hi), spec))
    minmax = quantization_mse(data, qparams_from_range(data.min(), data.max(), spec))
    # MSE minimizes this error; entropy minimizes a divergence, which lowers it less reliably.
    assert chosen < (0.8 if method is mse_range else 0.95) * minmax


@pytest.mark.parametrize("method", ["percentile", "entropy", "mse"])
def test_after_a_relu_the_range_is_zero_to_t(method):
    rng = np.random.default_rng(3)
    data = np.maximum(rng.laplace(size=100_000), 0.0).astype(np.float32)  # half exact zeros
    observer = make_observer(U8, CalibrationOptions(method=method), "relu")
    for batch in np.array_split(data, 7):
        observer.update(batch)
    qp = observer.qparams()
    assert qp.zero_point == 0  # lo is exactly 0: the zero point does not move
    top = float(qp.scale) * 255
    # The spike of exact zeros does not drag the range down (entropy leaves them out of the KL).
    assert 0.5 * data.max() < top < data.max()
    if method == "mse":
        assert quantization_mse(data, qp) < quantization_mse(data, qparams_from_range(0.0, data.max(), U8))


def test_mse_chooses_both_ends_of_a_skewed_signed_tensor():
    rng = np.random.default_rng(4)
    data = np.concatenate([-rng.exponential(0.5, 50_000), rng.exponential(3.0, 150_000)]).astype(np.float32)
    lo, hi = mse_range(anchored(data), I8_ASYMMETRIC)
    assert data.min() < lo < 0 < hi < data.max()
    assert -lo < hi / 3  # each end follows its own tail
    spec_range = qparams_from_range(np.float64(lo), np.float64(hi), I8_ASYMMETRIC)
    assert quantization_mse(data, spec_range) < quantization_mse(data, qparams_from_range(data.min(), data.max(), I8_ASYMMETRIC))


@pytest.mark.parametrize("method", [entropy_range, mse_range, lambda h, s: percentile_range(h, s, 99.9)])
def test_ranges_stay_inside_min_max_and_handle_degenerate_data(method):
    for data in (np.full(10, 2.5), np.zeros(10), -np.abs(np.random.default_rng(5).normal(size=5000)), np.array([-1.0, 1.0])):
        data = data.astype(np.float32)
        for spec in (U8, S8):
            lo, hi = method(anchored(data), spec)
            magnitude = float(np.abs(data).max())
            assert -magnitude - 1e-12 <= lo <= hi <= magnitude + 1e-12
            if not spec.symmetric:
                assert min(0.0, float(data.min())) <= lo and hi <= max(0.0, float(data.max()))
            qparams_from_range(np.float64(lo), np.float64(hi), spec)  # always valid qparams


def test_make_observer_maps_each_method():
    expected = {
        CalibrationMethod.MINMAX: MinMaxObserver,
        CalibrationMethod.PERCENTILE: PercentileObserver,
        CalibrationMethod.ENTROPY: EntropyObserver,
        CalibrationMethod.MSE: MSEObserver,
    }
    for method, cls in expected.items():
        observer = make_observer(U8, CalibrationOptions(method=method, bins=512, percentile=99.5), "t")
        assert type(observer) is cls and observer.name == "t"
        if cls is not MinMaxObserver:
            assert observer.histogram.bins == 512
    assert make_observer(U8, CalibrationOptions(method="percentile", percentile=99.5)).percentile == 99.5
    per_channel = QuantSpec("int8", True, axis=1)
    assert type(make_observer(per_channel, CalibrationOptions(method="minmax"))) is PerChannelMinMaxObserver
    with pytest.raises(UsageError, match="per tensor"):
        make_observer(per_channel, CalibrationOptions(method="entropy"), "w")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"method": "kl"}, "calibration method must be one of minmax, percentile, entropy, mse"),
        ({"weight_method": "entropy"}, "weight_method must be one of minmax, mse"),
        ({"percentile": 50.0}, r"percentile must be in \(50, 100\]"),
        ({"percentile": 100.5}, "percentile must be in"),
        ({"bins": 255}, "bins must be an integer in"),
        ({"bins": 2048.0}, "bins must be an integer in"),
    ],
)
def test_calibration_options_are_validated(kwargs, message):
    with pytest.raises(UsageError, match=message):
        CalibrationOptions(**kwargs)


def weight_error(weights: np.ndarray, lo, hi, spec: QuantSpec) -> np.ndarray:
    """Squared error per channel (axis 0)."""
    qp = qparams_from_range(lo, hi, spec)
    diff = dequantize(quantize(weights, qp), qp).astype(np.float64) - weights
    return np.sum(diff.reshape(len(weights), -1) ** 2, axis=1)


def test_weight_mse_lowers_the_error_of_every_channel():
    rng = np.random.default_rng(6)
    weights = rng.laplace(size=(16, 8, 3, 3)).astype(np.float32)  # heavier tails than normal, as trained weights
    weights[3] = 0.0  # an all-zero channel stays valid
    spec = QuantSpec(QuantDType.INT8, symmetric=True, axis=0)
    lo, hi = mse_weight_range(weights, spec)
    magnitude = np.abs(weights).max(axis=(1, 2, 3))
    np.testing.assert_array_equal(lo, -hi)
    assert np.all(hi <= magnitude) and np.all(hi >= 0.5 * magnitude - 1e-6)
    others = (1, 2, 3)
    minmax = weight_error(weights, weights.min(axis=others), weights.max(axis=others), spec)
    chosen = weight_error(weights, lo, hi, spec)
    assert np.all(chosen <= minmax * (1 + 1e-6)) and chosen.sum() < 0.97 * minmax.sum()
    # Per tensor: one threshold.
    lo, hi = mse_weight_range(weights, S8)
    assert np.ndim(hi) == 0 and 0.5 * np.abs(weights).max() <= hi < np.abs(weights).max()


def test_assign_qparams_uses_the_weight_method():
    model = conv_relu_pool_gemm()
    proto = to_proto(model)
    weights = onnx.numpy_helper.to_array(next(i for i in proto.graph.initializer if i.name == "w"))
    scales = {}
    for method in WeightMethod:
        model = ir.from_proto(proto)
        ShapeInferencePass()(model)
        AnnotatePass(qcompile.SchemeOptions())(model)
        # Activation ranges do not matter here: any valid qparams for every group.
        activation = {
            group: qparams_from_range(np.float64(-1), np.float64(1), spec) for group, spec in group_specs(model).items()
        }
        AssignQParamsPass(activation, weight_method=method)(model)
        scales[method] = model.graph.initializers["w"].meta[QPARAMS_KEY].scale
    np.testing.assert_allclose(scales[WeightMethod.MINMAX], np.abs(weights).max(axis=(1, 2, 3)) / 127, rtol=1e-6)
    expected = mse_weight_range(weights, QuantSpec(QuantDType.INT8, symmetric=True, axis=0))[1] / 127
    np.testing.assert_allclose(scales[WeightMethod.MSE], expected, rtol=1e-6)
    assert np.all(scales[WeightMethod.MSE] <= scales[WeightMethod.MINMAX])


@pytest.mark.parametrize("method", list(CalibrationMethod))
def test_every_method_compiles_a_model_close_to_float(method):
    rng = np.random.default_rng(7)
    model = to_proto(conv_relu_pool_gemm())
    feeds = [{"x": rng.normal(size=(4, 3, 8, 8)).astype(np.float32)} for _ in range(6)]
    options = qcompile.CompileOptions(
        calibration=CalibrationOptions(method=method, weight_method="mse"),
        verification=qcompile.VerificationOptions(enabled=False),
        show_progress=False,
    )
    result = qcompile.compile_model(model, feeds, options)
    assert result.report.calibration["method"] == method.value
    calibrate = next(p for p in result.report.passes if p.name == "calibrate")
    assert f"ranges by {method.value}" in calibrate.notes[0]
    test = {"x": rng.normal(size=(8, 3, 8, 8)).astype(np.float32)}
    assert sqnr_db(run(model, test)[0], run(result.model, test)[0]) > 25
    assert isinstance(ir.from_proto(result.model), ir.Model)
