"""DeriveBiasPass: bias scale = input scale × weight scale per channel; int32 overflow is fixed."""

import numpy as np
import onnx_ir as ir

from qcompile.graph.notes import notes
from qcompile.passes import DeriveBiasPass, PlaceQDQPass
from qcompile.quant.spec import QPARAMS_KEY
from tests.helpers import parse_model, run, sqnr_db
from tests.quant_helpers import annotate_and_calibrate

rng = np.random.default_rng(0)
TEXT = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N,3,6,6] x) => (float[N,4,6,6] y) {
  c = Conv <pads=[1,1,1,1]> (x, w, b)
  y = Relu(c)
}"""


def _feeds(n=6, batch=2):
    return [{"x": rng.normal(size=(batch, 3, 6, 6)).astype(np.float32)} for _ in range(n)]


def _values(model):
    return {v.name: v for v in list(model.graph.inputs) + list(model.graph.initializers.values())}


def test_bias_scale_is_input_scale_times_weight_scale():
    inits = dict(w=rng.normal(size=(4, 3, 3, 3)).astype(np.float32), b=rng.normal(size=4).astype(np.float32))
    model = annotate_and_calibrate(parse_model(TEXT, inits), _feeds())
    DeriveBiasPass()(model)
    values = _values(model)
    bias_qp = values["b"].meta[QPARAMS_KEY]
    expected = values["x"].meta[QPARAMS_KEY].scale * values["w"].meta[QPARAMS_KEY].scale
    np.testing.assert_array_equal(bias_qp.scale, expected.astype(np.float32))
    assert bias_qp.zero_point.dtype == np.int32 and not bias_qp.zero_point.any()
    assert notes(model) == []


def test_overflowing_bias_raises_that_channels_weight_scale():
    w = rng.normal(size=(4, 3, 3, 3)).astype(np.float32)
    w[2] *= 1e-9  # a channel BatchNorm folding scaled to almost nothing
    b = np.array([0.1, -0.2, 50.0, 0.3], dtype=np.float32)
    inits = dict(w=w, b=b)
    model = annotate_and_calibrate(parse_model(TEXT, inits), _feeds())
    values = _values(model)
    before = values["w"].meta[QPARAMS_KEY].scale.copy()
    DeriveBiasPass()(model)
    after = values["w"].meta[QPARAMS_KEY].scale
    assert after[2] > before[2] * 10
    np.testing.assert_array_equal(np.delete(after, 2), np.delete(before, 2))
    assert len(notes(model)) == 1 and "1 channel(s)" in notes(model)[0]
    bias_qp = values["b"].meta[QPARAMS_KEY]
    assert np.all(np.abs(b / bias_qp.scale) < np.iinfo(np.int32).max)
    PlaceQDQPass()(model)
    bias_init = next(v for v in model.graph.initializers.values() if v.dtype == ir.DataType.INT32)
    assert np.abs(bias_init.const_value.numpy()).max() < np.iinfo(np.int32).max
    x = _feeds(1, 8)[0]
    # The fixed channel still adds its bias: the output stays close to float.
    assert sqnr_db(run(parse_model(TEXT, inits), x)[0], run(model, x)[0]) > 30
