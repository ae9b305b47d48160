"""calibrate(): observed ranges equal those of the tensors computed directly over all data."""

from __future__ import annotations

import io
import sys

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from qcompile.calibration.collect import calibrate
from qcompile.calibration.observers import MinMaxObserver, PerChannelMinMaxObserver
from qcompile.data import feeds_from_iterable, feeds_from_path, input_specs
from qcompile.errors import InternalError, InvalidDataError
from qcompile.quant.qparams import qparams_from_range
from qcompile.quant.spec import QuantDType, QuantSpec
from tests.helpers import parse_model, run, to_proto

U8 = QuantSpec(QuantDType.UINT8, symmetric=False)

# Conv → Relu, with the Conv output also a graph output: what insert_observers produces.
CONV_RELU = """
<ir_version: 8, opset_import: ["" : 17]>
g (float[N,2,6,6] x) => (float[N,3,6,6] y, float[N,3,6,6] c) {
    c = Conv <pads = [1, 1, 1, 1]> (x, w, b)
    y = Relu(c)
}
"""


def conv_relu_ir() -> ir.Model:
    rng = np.random.default_rng(0)
    weights = {"w": rng.standard_normal((3, 2, 3, 3)).astype(np.float32), "b": np.array([0.5, -0.5, 0.0], np.float32)}
    return parse_model(CONV_RELU, weights)


def conv_relu() -> onnx.ModelProto:
    return to_proto(conv_relu_ir())


def feed_list(seed: int, sizes: list[int]) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((n, 2, 6, 6)).astype(np.float32)} for n in sizes]


def direct(model: onnx.ModelProto, feeds: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Every output over all feeds, concatenated on the batch axis."""
    outputs = [run(model, feed) for feed in feeds]
    names = [o.name for o in model.graph.output]
    return {name: np.concatenate([out[i] for out in outputs]) for i, name in enumerate(names)}


def test_ranges_equal_those_computed_directly_over_all_data():
    model = conv_relu()
    feeds = feed_list(1, [1, 3, 2, 4])
    observers = {"c": MinMaxObserver(U8, "c"), "y": MinMaxObserver(U8, "y")}
    stats = calibrate(model, feeds, observers, show_progress=False)
    reference = direct(model, feeds)
    for name, observer in observers.items():
        qp, expected = observer.qparams(), qparams_from_range(reference[name].min(), reference[name].max(), U8)
        np.testing.assert_allclose(qp.scale, expected.scale, rtol=1e-6)
        np.testing.assert_array_equal(qp.zero_point, expected.zero_point)
    assert reference["c"].min() < 0 and observers["y"].qparams().zero_point == 0  # Relu output starts at 0
    assert (stats.feeds, stats.samples) == (4, 10)
    assert stats.seconds >= 0


def test_per_channel_activation_observer_and_a_shared_observer():
    model = conv_relu()
    feeds = feed_list(2, [2, 2])
    per_channel = PerChannelMinMaxObserver(QuantSpec("int8", True, axis=1), "c")
    shared = MinMaxObserver(QuantSpec("int8", True), "c+y")
    calibrate(model, feeds, {"c": per_channel}, show_progress=False)
    calibrate(model, feeds, {"c": shared, "y": shared}, show_progress=False)
    reference = direct(model, feeds)
    c = reference["c"]
    expected = np.maximum(np.abs(c.min(axis=(0, 2, 3))), c.max(axis=(0, 2, 3))) / 127
    np.testing.assert_allclose(per_channel.qparams().scale, expected, rtol=1e-6)
    both = np.concatenate([reference["c"].ravel(), reference["y"].ravel()])
    assert shared.qparams().scale == pytest.approx(np.abs(both).max() / 127, rel=1e-6)


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_calibrates_from_a_feed_source(tmp_path, monkeypatch):
    model = conv_relu()
    feeds = feed_list(3, [2, 1, 3])
    for i, feed in enumerate(feeds):
        np.savez(tmp_path / f"{i:02d}.npz", **feed)
    source = feeds_from_path(tmp_path, input_specs(conv_relu_ir()))
    observer = MinMaxObserver(U8, "y")
    terminal = FakeTerminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    stats = calibrate(model, source, {"y": observer}, show_progress=True)
    assert (stats.feeds, stats.samples) == (3, 6)
    assert observer.qparams().scale == pytest.approx(direct(model, feeds)["y"].max() / 255, rel=1e-6)
    assert "calibrating" in terminal.getvalue() and "3/3" in terminal.getvalue()  # total from len(source)


@pytest.mark.parametrize("show_progress, terminal", [(False, True), (True, False)])
def test_no_progress_bar_when_disabled_or_not_on_a_terminal(monkeypatch, capsys, show_progress, terminal):
    stderr = FakeTerminal() if terminal else io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    calibrate(conv_relu(), feed_list(4, [1]), {"y": MinMaxObserver(U8, "y")}, show_progress=show_progress)
    assert stderr.getvalue() == "" and capsys.readouterr().out == ""


def test_zero_feeds():
    with pytest.raises(InvalidDataError, match="no calibration data"):
        calibrate(conv_relu(), [], {"y": MinMaxObserver(U8, "y")}, show_progress=False)


def test_onnxruntime_failure_names_the_feed():
    feeds = feed_list(5, [1]) + [{"x": np.zeros((1, 2, 6), np.float32)}]
    with pytest.raises(InvalidDataError, match="onnxruntime failed on calibration feed 1: "):
        calibrate(conv_relu(), feeds, {"y": MinMaxObserver(U8, "y")}, show_progress=False)


def test_nan_computed_by_the_model_names_feed_and_tensor():
    text = '<ir_version: 8, opset_import: ["" : 17]> g (float[N] x) => (float[N] y) { y = Log(x) }'
    model = to_proto(parse_model(text))
    feeds = [{"x": np.array([1.0, 2.0], np.float32)}, {"x": np.array([-1.0], np.float32)}]
    with pytest.raises(InvalidDataError, match="calibration feed 1: tensor 'y' contains NaN"):
        calibrate(model, feeds, {"y": MinMaxObserver(U8, "y")}, show_progress=False)


def test_a_tensor_that_is_not_an_output_is_a_bug():
    with pytest.raises(InternalError, match="not outputs of the observation model"):
        calibrate(conv_relu(), feed_list(6, [1]), {"z": MinMaxObserver(U8, "z")}, show_progress=False)


def test_streams_one_batch_at_a_time():
    seen = []

    class Recording(MinMaxObserver):
        def update(self, array: np.ndarray) -> None:
            seen.append(array.shape[0])
            super().update(array)

    source = feeds_from_iterable(iter(feed_list(7, [2, 1, 3])), input_specs(conv_relu_ir()))
    stats = calibrate(conv_relu(), source, {"y": Recording(U8, "y")}, show_progress=False)
    assert seen == [2, 1, 3] and stats.samples == 6
