"""qcompile analyze: per-layer SQNR in graph order, clipping, first sharp drop, weights and biases."""

import json

import numpy as np
import onnx
from click.testing import CliRunner

import qcompile
from qcompile.cli import main
from qcompile.verify.analysis import analyze
from tests.helpers import parse_model, sqnr_db, to_proto
from tests.passes.test_annotate import CONV_RELU_POOL_GEMM

rng = np.random.default_rng(0)
TEXT = CONV_RELU_POOL_GEMM


def _models():
    inits = dict(
        w=rng.normal(size=(4, 3, 3, 3)).astype(np.float32), b=rng.normal(size=4).astype(np.float32),
        fw=rng.normal(size=(10, 64)).astype(np.float32), fb=rng.normal(size=10).astype(np.float32),
    )
    float_model = to_proto(parse_model(TEXT, inits))
    calib = [{"x": rng.normal(size=(4, 3, 8, 8)).astype(np.float32)} for _ in range(4)]
    quant = qcompile.compile_model(float_model, calib, qcompile.CompileOptions(show_progress=False), verify_data=calib[:1]).model
    return float_model, quant


def test_layers_in_graph_order_with_sqnr_matching_numpy_and_no_clipping_on_calibration_range():
    float_model, quant = _models()
    data = [{"x": rng.normal(size=(4, 3, 8, 8)).astype(np.float32)} for _ in range(3)]
    result = analyze(float_model, quant, data)
    assert [a.name for a in result.activations] == ["x", "r", "p", "f"]
    assert result.samples == 12
    # The input's SQNR is its own rounding: check it against numpy.
    x = np.concatenate([d["x"] for d in data])
    q = next(n for n in quant.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "x")
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in quant.graph.initializer}
    scale, zp = float(inits[q.input[1]]), int(inits[q.input[2]])
    restored = (np.clip(np.rint(x / scale) + zp, 0, 255) - zp) * scale
    assert abs(result.activations[0].sqnr_db - sqnr_db(x, restored)) < 0.01
    # New data beyond the calibration range clips a little; values are rates in [0, 1].
    assert all(0.0 <= a.clip_rate < 0.05 for a in result.activations)
    assert len(result.weights) == 2 and all(w.estimated_sqnr_db > 30 for w in result.weights)
    assert len(result.biases) == 2 and not any(b.saturated for b in result.biases)


def test_clipping_is_measured_on_out_of_range_data():
    float_model, quant = _models()
    # Ten times the calibration scale: the input clips.
    data = [{"x": 10 * rng.normal(size=(4, 3, 8, 8)).astype(np.float32)}]
    result = analyze(float_model, quant, data)
    assert result.activations[0].clip_rate > 0.3
    assert result.activations[0].observed_max > result.activations[0].representable_max


def test_first_sharp_drop_names_the_layer_whose_range_is_broken():
    float_model, quant = _models()
    data = [{"x": rng.normal(size=(4, 3, 8, 8)).astype(np.float32)}]
    assert analyze(float_model, quant, data).first_sharp_drop is None
    # Shrink the Relu output's scale tenfold: it clips, and the error enters there.
    q = next(n for n in quant.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == "r")
    scale = next(t for t in quant.graph.initializer if t.name == q.input[1])
    scale.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(scale) / 10, scale.name))
    result = analyze(float_model, quant, data)
    assert result.first_sharp_drop == "r"
    assert result.activations[1].clip_rate > 0.2


def test_cli_analyze_writes_json_and_html(tmp_path):
    float_model, quant = _models()
    onnx.save(float_model, tmp_path / "f.onnx")
    onnx.save(quant, tmp_path / "q.onnx")
    np.savez(tmp_path / "d.npz", x=rng.normal(size=(6, 3, 8, 8)).astype(np.float32))
    result = CliRunner().invoke(
        main, ["analyze", str(tmp_path / "f.onnx"), str(tmp_path / "q.onnx"), "--data", str(tmp_path / "d.npz"),
               "--json", "--html", str(tmp_path / "a.html")]
    )
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert [a["name"] for a in payload["activations"]] == ["x", "r", "p", "f"]
    page = (tmp_path / "a.html").read_text()
    assert "<svg" in page and "polyline" in page
