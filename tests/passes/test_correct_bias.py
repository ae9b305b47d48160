"""CorrectBiasPass: the mean output error per channel moves into the int32 bias; off restores the old output."""

import numpy as np
import onnx

import qcompile
from tests.helpers import count_ops, run

rng = np.random.default_rng(0)
TEXT = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N,8,6,6] x) => (float[N,8,6,6] y) {
  c = Conv <pads=[1,1,1,1]> (x, w, b)
  y = Conv (c, w2, b2)
}"""


def _model() -> onnx.ModelProto:
    proto = onnx.parser.parse_model(TEXT)
    # Weights whose int8 rounding leaves a visible mean shift: few, large, irregular values per channel.
    w = rng.normal(size=(8, 8, 3, 3)) * rng.uniform(0.01, 1.0, size=(8, 1, 1, 1))
    w[:, :, 0, 0] += 3.0
    arrays = dict(w=w, b=rng.normal(size=8), w2=rng.normal(size=(8, 8, 1, 1)), b2=rng.normal(size=8))
    proto.graph.initializer.extend(onnx.numpy_helper.from_array(a.astype(np.float32), n) for n, a in arrays.items())
    return proto


def _feeds(n):
    # Inputs with a non-zero mean: rounding errors in the weights then shift the outputs' means.
    return [{"x": (rng.normal(size=(4, 8, 6, 6)) + 1.5).astype(np.float32)} for _ in range(n)]


def _mean_error(float_model, quant_model, feeds):
    ref = np.concatenate([run(float_model, f)[0] for f in feeds])
    out = np.concatenate([run(quant_model, f)[0] for f in feeds])
    return np.abs((ref - out).mean(axis=(0, 2, 3))).mean()


def test_bias_correction_reduces_mean_output_error_and_off_restores_the_old_output():
    model, calib, held_out = _model(), _feeds(8), _feeds(4)

    def compile_with(batches):
        options = qcompile.CompileOptions(
            show_progress=False, calibration=qcompile.CalibrationOptions(bias_correction_batches=batches)
        )
        return qcompile.compile_model(model, calib, options, verify_data=held_out)

    plain, corrected = compile_with(0), compile_with(8)
    assert [p.name for p in corrected.report.passes].count("correct_bias") == 1
    assert "correct_bias" not in [p.name for p in plain.report.passes]
    assert _mean_error(model, corrected.model, held_out) < 0.5 * _mean_error(model, plain.model, held_out)
    assert count_ops(corrected.model) == count_ops(plain.model)
    # Off is exactly the old compile.
    assert compile_with(0).model.SerializeToString() == plain.model.SerializeToString()
