"""ConvertFloat16Pass: fp16 numbers against onnxruntime's fp32 run, casts at the boundaries, the overflow guard."""

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
import pytest
from onnx.reference import ReferenceEvaluator

import qcompile
from qcompile.passes.convert_fp16 import FP16, OVERFLOW, PRECISION_KEY, ConvertFloat16Pass, precision_summary
from qcompile.targets import CUDA
from tests.helpers import count_ops, parse_model, run, sqnr_db

rng = np.random.default_rng(0)

CONV_NET = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N,3,8,8] x) => (float[N,5] y, float[N,5] p) {
  c1 = Conv <pads=[1,1,1,1]> (x, w1, b1)
  r1 = Relu(c1)
  c2 = Conv <pads=[1,1,1,1]> (r1, w2, b2)
  a = Add(c2, r1)
  g = GlobalAveragePool(a)
  f = Flatten(g)
  y = Gemm <transB=1> (f, fw, fb)
  p = Softmax <axis=1> (y)
}"""


def conv_net() -> ir.Model:
    arrays = dict(w1=rng.normal(size=(4, 3, 3, 3)), b1=rng.normal(size=4), w2=rng.normal(size=(4, 4, 3, 3)) * 0.3,
                  b2=rng.normal(size=4), fw=rng.normal(size=(5, 4)), fb=rng.normal(size=5))
    return parse_model(CONV_NET, {k: np.asarray(v, np.float32) for k, v in arrays.items()})


def image(batch=4):
    return {"x": rng.normal(size=(batch, 3, 8, 8)).astype(np.float32)}


def convert(model: ir.Model, max_abs=None, **kwargs) -> ir.Model:
    common_passes.ShapeInferencePass()(model)  # the pass's precondition: dtypes are known
    result = ConvertFloat16Pass(max_abs or {}, CUDA.keep_fp32_ops, **kwargs)(model)
    assert result.modified
    onnx.checker.check_model(ir.to_proto(result.model))
    return result.model


def test_fp16_keeps_float32_interface_and_matches_fp32():
    float_model = conv_net()
    feed = image()
    expected = run(float_model, feed)
    model = convert(ir.from_proto(ir.to_proto(float_model)))
    proto = ir.to_proto(model)
    # The interface is unchanged: float32 in, float32 out, same names.
    assert [i.type.tensor_type.elem_type for i in proto.graph.input] == [onnx.TensorProto.FLOAT]
    assert [o.type.tensor_type.elem_type for o in proto.graph.output] == [onnx.TensorProto.FLOAT] * 2
    assert [o.name for o in proto.graph.output] == ["y", "p"]
    # Weights are stored fp16.
    weights = {t.name: t.data_type for t in proto.graph.initializer}
    assert weights["w1"] == weights["w2"] == weights["fw"] == onnx.TensorProto.FLOAT16
    # Softmax stays fp32: one Cast into it (from the Gemm), one Cast on the input; y gets its own.
    assert precision_summary(model) == {"fp16": 7, "fp32": 1}
    assert count_ops(model)["Cast"] == 3
    got = run(model, feed)
    for ref, out in zip(expected, got):
        assert out.dtype == np.float32
        assert sqnr_db(ref, out) > 40


def test_shared_constant_read_by_fp32_and_fp16_nodes_gets_a_copy():
    text = """<ir_version: 8, opset_import: ["" : 17]>
    g (float[2,4] x) => (float[2,4] y, float[2,4] z) {
      y = Add(x, c)
      s = Softmax(x)
      z = Mul(s, c)
      }"""
    c = np.linspace(-1, 1, 8).reshape(2, 4).astype(np.float32)
    model = convert(parse_model(text, {"c": c}))
    types = {t.name: t.data_type for t in ir.to_proto(model).graph.initializer}
    assert types["c"] == onnx.TensorProto.FLOAT16 or types.get("c_fp16") == onnx.TensorProto.FLOAT16
    feed = {"x": rng.normal(size=(2, 4)).astype(np.float32)}
    for ref, out in zip(run(parse_model(text, {"c": c}), feed), run(model, feed)):
        assert sqnr_db(ref, out) > 40


# Activations reach ~1e5 inside (beyond fp16's 65504) and come back into range after the scale.
OVERFLOW_NET = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N,16] x) => (float[N,8] y, float[N,8] h) {
  x1 = Add(x, b)
  h = MatMul(x1, w)
  r = Relu(h)
  m = Mul(r, s)
  y = Add(m, b2)
}"""


def overflow_model() -> ir.Model:
    w = np.full((16, 8), 400.0, np.float32) * np.sign(rng.normal(size=(16, 8))).astype(np.float32)
    b, b2 = np.full(16, 0.5, np.float32), np.linspace(-1, 1, 8).astype(np.float32)
    return parse_model(OVERFLOW_NET, {"w": w, "s": np.array(1e-3, np.float32), "b": b, "b2": b2})


def overflow_feeds(n=4):
    return [{"x": (np.abs(rng.normal(size=(2, 16))) * 60 + 20).astype(np.float32)} for _ in range(n)]


def run_fp16_faithfully(model: ir.Model, feed) -> list[np.ndarray]:
    """onnx's reference evaluator: numpy in each tensor's own type, as a GPU's fp16 kernels store it.

    onnxruntime's CPU provider runs fp16 ops without an fp16 kernel in fp32 between inserted casts
    and drops the fp32→fp16→fp32 cast pairs, which hides an fp16 overflow.
    """
    return ReferenceEvaluator(ir.to_proto(model)).run(None, feed)


def test_without_ranges_fp16_overflows_to_inf():
    model = convert(overflow_model())
    with np.errstate(over="ignore"):
        y, h = run_fp16_faithfully(model, overflow_feeds(1)[0])
    assert not np.isfinite(h).all() and not np.isfinite(y).all()


def test_overflow_guard_keeps_large_tensors_in_fp32():
    feed = overflow_feeds(1)[0]
    float_model = overflow_model()
    reference = run(float_model, feed)[1]
    assert np.abs(reference).max() > 65504  # the model really leaves fp16's range inside
    max_abs = {"x": 300.0, "x1": 300.0, "h": 2e5, "r": 2e5, "m": 200.0, "y": 200.0}
    model = convert(ir.from_proto(ir.to_proto(float_model)), max_abs)
    by_output = {n.outputs[0].name: n.meta.get(PRECISION_KEY, (None, ""))[0] for n in model.graph}
    assert by_output["h"] == by_output["r"] == OVERFLOW
    assert by_output["m"] == OVERFLOW  # it reads r
    assert by_output["x1"] == FP16 and by_output["y"] is None  # y is the output Cast
    assert count_ops(model)["Cast"] == 4  # x→fp16, x1→fp32 (MatMul), m→fp16 (Add), y→fp32 (output)
    for ref, out in zip(run(float_model, feed), run_fp16_faithfully(model, feed)):
        assert np.isfinite(out).all() and sqnr_db(ref, out) > 60


def test_compile_for_cuda_calibrates_the_overflow_guard():
    options = qcompile.CompileOptions(target="cuda", show_progress=False,
                                      verification=qcompile.VerificationOptions(latency=False))
    feeds = overflow_feeds(6)
    float_model = ir.to_proto(overflow_model())
    result = qcompile.compile_model(float_model, feeds[:4], options, verify_data=feeds[4:])
    for ref, out in zip(run(float_model, feeds[5]), run_fp16_faithfully(ir.from_proto(result.model), feeds[5])):
        assert np.isfinite(out).all() and sqnr_db(ref, out) > 60
    verification = result.report.verification
    assert verification["min_sqnr_db"] > 60
    assert result.report.target["precision"] == {"fp16": 2, "fp32": 3}
    notes = [n for p in result.report.passes if p.name == "convert_fp16" for n in p.notes]
    assert any("kept fp32" in n and "overflow" in n for n in notes), notes
    assert result.report.options["calibration"]["method"] == "mse"  # the user's option is unchanged...
    calibrate = next(p for p in result.report.passes if p.name == "calibrate")
    assert "ranges by minmax" in calibrate.notes[0]  # ...but overflow is judged on min/max


def test_overflow_limit_is_validated():
    with pytest.raises(ValueError):
        ConvertFloat16Pass({}, overflow_limit=1e6)


def test_shape_and_cast_read_fp16_without_a_cast_and_computed_divisors_stay_fp32():
    text = """<ir_version: 8, opset_import: ["" : 17]>
    g (float[2,4] x, float[2,4] d) => (float[2,4] y, int64[2] s, float[2,4] q) {
      a = Relu(x)
      s = Shape(a)
      c = Cast <to=1> (a)
      y = Div(c, two)
      q = Div(a, d)
    }"""
    float_model = parse_model(text, {"two": np.array(2.0, np.float32)})
    model = convert(ir.from_proto(ir.to_proto(float_model)))
    kinds = {n.outputs[0].name: n.meta.get(PRECISION_KEY, (None, ""))[0] for n in model.graph}
    assert kinds["a"] == FP16 and kinds["q"] == "sensitive"  # a divisor computed at run time
    # Shape and Cast read the fp16 Relu output directly; Div by a constant runs in fp16.
    by_output = {n.outputs[0].name: n for n in model.graph}
    assert by_output["s"].inputs[0].producer().op_type == "Relu"
    assert by_output["c"].inputs[0].producer().op_type == "Relu"
    divide = by_output["y"].inputs[0].producer()  # y itself is the output Cast back to float32
    assert divide.op_type == "Div" and divide.meta[PRECISION_KEY][0] == FP16
    assert count_ops(model)["Cast"] == 5  # the model's own, x→fp16, a→fp32 for q, c→fp16, y→fp32
    feed = {"x": rng.normal(size=(2, 4)).astype(np.float32), "d": rng.uniform(1, 2, size=(2, 4)).astype(np.float32)}
    for ref, out in zip(run(float_model, feed), run(model, feed)):
        if ref.dtype == np.float32:
            assert sqnr_db(ref, out) > 40
        else:
            np.testing.assert_array_equal(ref, out)
