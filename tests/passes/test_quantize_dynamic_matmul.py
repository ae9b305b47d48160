"""QuantizeDynamicMatMulPass: numbers against onnxruntime, op counts, onnxruntime's fusion, the off switch."""

import numpy as np
import onnx
import onnx_ir.passes.common as common_passes
import pytest

import qcompile
from qcompile.options import CompileOptions, SchemeOptions, SmoothQuantOptions, VerificationOptions, WeightGranularity
from qcompile.passes import QuantizeDynamicMatMulPass
from qcompile.verify.fusion import check_fusion, optimized_graph
from tests.helpers import count_ops, parse_model, run, sqnr_db, to_proto
from tests.quant_helpers import quantize

rng = np.random.default_rng(0)

# LayerNormalization feeds two MatMuls (one with a bias Add) and the residual Add: the MatMuls'
# input comes from a float op, so static quantization needs a standalone QuantizeLinear for it.
LN_MATMUL = """<ir_version: 8, opset_import: ["" : 17]>
g (float[2,5,16] x) => (float[2,5,8] y, float[2,5,8] z, float[2,5,16] r) {
  n = LayerNormalization <axis=-1> (x, gamma, beta)
  m = MatMul(n, w)
  y = Add(bias, m)
  z = MatMul(n, v)
  r = Add(n, x)
}"""

ONE_MATMUL = """<ir_version: 8, opset_import: ["" : 17]>
g (float[2,5,16] x) => (float[2,5,8] y) {
  n = LayerNormalization <axis=-1> (x, gamma, beta)
  m = MatMul(n, w)
  y = Add(m, bias)
}"""


def _model(text=LN_MATMUL):
    inits = dict(
        gamma=rng.uniform(0.5, 2.0, size=16).astype(np.float32), beta=rng.normal(size=16).astype(np.float32),
        w=rng.normal(size=(16, 8)).astype(np.float32), v=rng.normal(size=(16, 8)).astype(np.float32),
        bias=rng.normal(size=8).astype(np.float32),
    )
    needed = {k: a for k, a in inits.items() if k in text}
    return lambda: parse_model(text, needed)


def _feeds(n=8):
    return [{"x": rng.normal(size=(2, 5, 16)).astype(np.float32)} for _ in range(n)]


def _dynamic(make, scheme=None):
    model = quantize(make(), _feeds(), scheme)
    result = QuantizeDynamicMatMulPass()(model)
    common_passes.RemoveUnusedNodesPass()(model)
    common_passes.TopologicalSortPass()(model)
    return model, result.modified


def _initializer(model, suffix):
    return next(v.const_value.numpy() for v in model.graph.initializers.values() if v.name.endswith(suffix))


def test_rewrite_computes_dynamic_quantization_as_onnxruntime_does():
    make = _model()
    model, modified = _dynamic(make)
    assert modified
    onnx.checker.check_model(to_proto(model), full_check=True)
    x = _feeds(1)[0]
    n = run(parse_model("""<ir_version: 8, opset_import: ["" : 17]>
        g (float[2,5,16] x) => (float[2,5,16] n) { n = LayerNormalization <axis=-1> (x, gamma, beta) }""",
        {k: _initializer(model, k) for k in ("gamma", "beta")}), x)[0]
    # DynamicQuantizeLinear (ONNX spec): the range always holds 0; uint8; round half to even.
    lo, hi = min(0.0, float(n.min())), max(0.0, float(n.max()))
    scale = np.float32((hi - lo) / 255)
    zero_point = np.clip(np.round(-lo / scale), 0, 255)
    n_q = np.clip(np.round(n / scale) + zero_point, 0, 255)
    w_q, w_scale = _initializer(model, "w_quantized").astype(np.float64), _initializer(model, "w_scale")
    expected_y = ((n_q - zero_point) @ w_q) * (scale * w_scale) + _initializer(model, "bias")
    y, z, r = run(model, x)
    np.testing.assert_allclose(y, expected_y, rtol=1e-5, atol=1e-4)
    # The fused kernels compute the same numbers.
    y_fused = _run_optimized(model, x)[0]
    np.testing.assert_allclose(y_fused, y, rtol=1e-5, atol=1e-4)
    # Close to float; the residual Add reads the float LayerNormalization output again (exact).
    ref = run(make(), x)
    assert sqnr_db(ref[0], y) > 30 and sqnr_db(ref[1], z) > 30
    np.testing.assert_array_equal(r, ref[2])


def _run_optimized(model, feed):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(to_proto(model).SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feed)


def test_op_counts_before_and_after():
    make = _model()
    static = quantize(make(), _feeds())
    before = count_ops(static)
    assert before["QuantizeLinear"] == 1 and before["MatMul"] == 2 and before["DynamicQuantizeLinear"] == 0
    model, _ = _dynamic(make)
    after = count_ops(model)
    # One DynamicQuantizeLinear serves both MatMuls; the static pair is gone (the Add reads float).
    assert after["DynamicQuantizeLinear"] == 1 and after["QuantizeLinear"] == 0
    assert after["MatMulInteger"] == 2 and after["Cast"] == 2 and after["Mul"] == 4 and after["MatMul"] == 0
    # Only the weights' DequantizeLinear nodes went: MatMulInteger reads the int8 weights directly.
    assert after["DequantizeLinear"] == 0


def test_onnxruntime_fuses_the_rewrite():
    model, _ = _dynamic(_model())
    ops = count_ops(optimized_graph(to_proto(model)))
    # Two readers of one DynamicQuantizeLinear: it stays; each MatMul (with its bias) is one kernel.
    assert ops["MatMulIntegerToFloat"] == 2 and ops["DynamicQuantizeLinear"] == 1
    assert ops["MatMulInteger"] == 0 and ops["Cast"] == 0 and ops["Add"] == 1  # the residual Add only
    report = check_fusion(to_proto(model))
    assert report.fused and report.kernels == {"MatMulIntegerToFloat": 2}
    # One reader: the quantization joins the kernel too.
    single, _ = _dynamic(_model(ONE_MATMUL))
    ops = count_ops(optimized_graph(to_proto(single)))
    assert ops["DynamicQuantizeMatMul"] == 1 and ops["DynamicQuantizeLinear"] == 0 and ops["Add"] == 0


def test_per_tensor_weights_are_rewritten_too():
    make = _model(ONE_MATMUL)
    model, modified = _dynamic(make, SchemeOptions(weight_granularity=WeightGranularity.PER_TENSOR))
    assert modified and count_ops(model)["MatMulInteger"] == 1
    x = _feeds(1)[0]
    assert sqnr_db(run(make(), x)[0], run(model, x)[0]) > 25


def test_int8_activations_keep_the_static_form():
    """DynamicQuantizeLinear is uint8 only."""
    model, modified = _dynamic(_model(ONE_MATMUL), SchemeOptions(activation_dtype="int8"))
    assert not modified and count_ops(model)["DynamicQuantizeLinear"] == 0


def test_matmul_after_an_int8_op_keeps_the_static_form():
    """The input is a quantized Concat's output: its QuantizeLinear is fused into that op."""
    make = lambda: parse_model(  # noqa: E731
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[4,8] x) => (float[4,8] y) {
          a = MatMul(x, w1)
          b = MatMul(x, w2)
          c = Concat <axis=1> (a, b)
          y = MatMul(c, w3)
        }""",
        dict(w1=rng.normal(size=(8, 4)).astype(np.float32), w2=rng.normal(size=(8, 4)).astype(np.float32),
             w3=rng.normal(size=(8, 8)).astype(np.float32)),
    )
    model = quantize(make(), [{"x": rng.normal(size=(4, 8)).astype(np.float32)} for _ in range(4)])
    QuantizeDynamicMatMulPass()(model)
    ops = count_ops(model)
    # The graph input x feeds two MatMuls: rewritten; the Concat's reader keeps its static input.
    assert ops["MatMulInteger"] == 2 and ops["MatMul"] == 1 and ops["DynamicQuantizeLinear"] == 1


@pytest.mark.parametrize("dynamic", [True, False])
def test_option_off_restores_the_static_model(dynamic):
    make = _model()
    # SmoothQuant off: the static reference below is the plain annotate → calibrate → Q/DQ path.
    # Sibling fusion off: this counts quantize_dynamic_matmul's own form (fuse_sibling_matmuls has its tests).
    options = CompileOptions(scheme=SchemeOptions(dynamic_matmul=dynamic, fuse_sibling_matmuls=False),
                             verification=VerificationOptions(enabled=False),
                             smooth_quant=SmoothQuantOptions(enabled=False), show_progress=False)
    feeds = _feeds()
    result = qcompile.compile_model(to_proto(make()), feeds, options)
    compiled = result.model
    ran = {r.name: r.modified for r in result.report.passes}
    static = quantize(make(), feeds)
    x = _feeds(1)[0]
    if dynamic:
        assert count_ops(compiled)["DynamicQuantizeLinear"] == 1 and ran["quantize_dynamic_matmul"]
        # The report still counts them quantized: as what the file holds.
        summary = result.report.quantization
        assert summary.quantized_ops == {"MatMulInteger": 2} and (summary.activations, summary.weights) == (1, 2)
    else:
        assert "quantize_dynamic_matmul" not in ran
        assert count_ops(compiled) == count_ops(static)
        for got, want in zip(run(compiled, x), run(static, x)):
            np.testing.assert_array_equal(got, want)
