import json
import math

import numpy as np
import pytest

from qcompile.errors import InvalidDataError, InvalidModelError, UsageError
from qcompile.verify.compare import compare_models, run_model
from tests.helpers import sqnr_db
from tests.verify.models import CONSTANT, feeds, mlp, mlp_ir, model_from_text, numpy_mlp


def _all_x(batches):
    return np.concatenate([f["x"] for f in batches])


def test_model_against_itself_is_perfect():
    batches = feeds()
    result = compare_models(mlp(), mlp_ir(), batches)
    (y,) = result.outputs
    assert y.name == "y"
    assert y.sqnr_db == math.inf
    assert y.cosine == pytest.approx(1.0) and y.mean_sample_cosine == pytest.approx(1.0)
    assert y.top1_agreement == 1.0
    assert y.max_abs_error == 0.0
    assert result.samples == y.samples == 12
    assert result.layers == ()
    assert result.provider == "cpu" and result.seconds > 0
    assert result.passed(None) and result.passed(1000.0)
    j = result.to_json()
    assert j["min_sqnr_db"] is None and j["outputs"][0]["sqnr_db"] is None
    json.dumps(j, allow_nan=False)


def test_perturbed_output_has_the_sqnr_numpy_predicts():
    batches = feeds()
    x = _all_x(batches)
    expected_y = numpy_mlp(x)["y"]
    # The copy adds CONSTANT to every output element: noise = size · CONSTANT².
    expected = 10 * np.log10(np.sum(expected_y**2) / (expected_y.size * CONSTANT**2))
    result = compare_models(mlp(), mlp(add_to_output=True), iter(batches))  # any iterable
    (y,) = result.outputs
    assert y.sqnr_db == pytest.approx(expected, abs=1e-3)
    assert y.max_abs_error == pytest.approx(CONSTANT, rel=1e-4)
    assert y.mean_abs_error == pytest.approx(CONSTANT, rel=1e-4)
    assert result.min_sqnr == y.sqnr_db
    assert result.passed(expected - 1.0)
    assert not result.passed(expected + 1.0)


def test_per_layer_sqnr_in_the_requested_order():
    batches = feeds()
    x = _all_x(batches)
    ref, test = numpy_mlp(x), numpy_mlp(x, add_to_hidden=True)
    float_model, quant_model = mlp(), mlp(add_to_hidden=True)
    outputs_before = [len(m.graph.output) for m in (float_model, quant_model)]

    result = compare_models(float_model, quant_model, batches, layer_names=["r", "h", "y"])

    assert [layer.name for layer in result.layers] == ["r", "h", "y"]
    r, h, y = result.layers
    assert h.sqnr_db == math.inf  # the perturbation comes after h
    assert r.sqnr_db == pytest.approx(sqnr_db(ref["r"], test["r"]), abs=1e-3)
    assert y.sqnr_db == pytest.approx(sqnr_db(ref["y"], test["y"]), abs=1e-3)
    assert y.sqnr_db == pytest.approx(result.outputs[0].sqnr_db, abs=1e-3)
    assert 0.9 < r.cosine < 1.0
    # layers never count towards the verdict, and the inputs were not modified
    assert result.min_sqnr == result.outputs[0].sqnr_db
    assert [len(m.graph.output) for m in (float_model, quant_model)] == outputs_before
    assert [layer["name"] for layer in result.to_json()["layers"]] == ["r", "h", "y"]


def test_unknown_layer_name_is_a_usage_error():
    with pytest.raises(UsageError, match="not_there"):
        compare_models(mlp(), mlp(), feeds(1), layer_names=["h", "not_there"])


def test_nan_in_the_quantized_output_fails_without_threshold():
    float_model = model_from_text("y = Abs(x)")
    quant_model = model_from_text("y = Sqrt(x)")  # NaN for negative inputs
    result = compare_models(float_model, quant_model, feeds(2))
    (y,) = result.outputs
    assert y.nonfinite > 0 and y.sqnr_db == -math.inf
    assert not result.passed(None)
    json.dumps(result.to_json(), allow_nan=False)


def test_feed_that_does_not_match_the_inputs():
    with pytest.raises(InvalidDataError, match="missing \\['x'\\]"):
        compare_models(mlp(), mlp(), [{"z": np.zeros((1, 4), np.float32)}])
    with pytest.raises(InvalidDataError, match="batch 0"):
        compare_models(mlp(), mlp(), [{"x": np.zeros((1, 4), np.int64)}])


def test_no_feeds_is_an_error():
    with pytest.raises(InvalidDataError, match="no verification samples"):
        compare_models(mlp(), mlp(), [])


def test_outputs_that_cannot_be_paired():
    two = model_from_text("y = Abs(x)\n z = Neg(x)", "(float[N, 4] x) => (float[N, 4] y, float[N, 4] z)")
    one = model_from_text("w = Abs(x)", "(float[N, 4] x) => (float[N, 4] w)")
    with pytest.raises(InvalidModelError, match="outputs do not match"):
        compare_models(two, one, feeds(1))


def test_outputs_paired_by_position_when_renamed():
    renamed = model_from_text("w = Abs(x)", "(float[N, 4] x) => (float[N, 4] w)")
    result = compare_models(model_from_text("y = Abs(x)"), renamed, feeds(1))
    assert [o.name for o in result.outputs] == ["y"] and result.outputs[0].sqnr_db == math.inf


def test_run_model_yields_one_output_list_per_feed():
    batches = feeds(2)
    outs = list(run_model(mlp(), batches))
    assert len(outs) == 2
    np.testing.assert_allclose(outs[1][0], numpy_mlp(batches[1]["x"])["y"], rtol=1e-5, atol=1e-5)
