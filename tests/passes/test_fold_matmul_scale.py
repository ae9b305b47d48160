"""FoldMatMulScalePass: numbers against onnxruntime, op counts, onnxruntime's fusion, declines."""

import numpy as np
import onnx
import onnx_ir.passes.common as common_passes
import pytest

import qcompile

from qcompile.graph.notes import notes
from qcompile.passes import FoldMatMulScalePass, QuantizeDynamicMatMulPass
from qcompile.verify.fusion import check_fusion, optimized_graph
from tests.helpers import assert_numerically_close, count_ops, parse_model, run, to_proto
from tests.quant_helpers import quantize

rng = np.random.default_rng(0)

# Attention scores: two activations multiplied, scaled by a constant, then Softmax.
SCORES = """<ir_version: 8, opset_import: ["" : 17]>
g (float[2,5,8] q, float[2,8,5] k) => (float[2,5,5] y) {
  m = MatMul(q, k)
  s = {scaled}
  y = Softmax <axis=-1> (s)
}"""

# A weight MatMul reading a float op's output (the dynamic form), with or without its bias.
PROJECTION = """<ir_version: 8, opset_import: ["" : 17]>
g (float[2,5,16] x) => (float[2,5,8] y) {
  n = LayerNormalization <axis=-1> (x, gamma, beta)
  m = MatMul(n, w)
  {body}
  y = Softmax <axis=-1> (s)
}"""


def _scores(scaled="Mul(m, c)", c=0.125):
    text = SCORES.replace("{scaled}", scaled)
    inits = {"c": np.array(c, dtype=np.float32)} if "c" in scaled else {}
    return parse_model(text, inits)


def _score_feeds(n=6):
    return [{"q": rng.normal(size=(2, 5, 8)).astype(np.float32), "k": rng.normal(size=(2, 8, 5)).astype(np.float32)} for _ in range(n)]


PROJECTION_WEIGHTS = dict(
    gamma=rng.uniform(0.5, 2.0, size=16).astype(np.float32), beta=rng.normal(size=16).astype(np.float32),
    w=rng.normal(size=(16, 8)).astype(np.float32), bias=rng.normal(size=8).astype(np.float32),
    c=np.array(0.5, dtype=np.float32),
)


def _projection(bias=True):
    text = PROJECTION.replace("{body}", "b = Add(m, bias)\n  s = Mul(b, c)" if bias else "s = Mul(m, c)")
    return parse_model(text, {k: a for k, a in PROJECTION_WEIGHTS.items() if bias or k != "bias"})


def _fold(model):
    result = FoldMatMulScalePass()(model)
    common_passes.RemoveUnusedNodesPass()(model)
    return result.modified


@pytest.mark.parametrize("scaled", ["Mul(m, c)", "Mul(c, m)", "Div(m, c)"])
def test_score_scale_goes_into_the_dequantize_scale(scaled):
    c = 0.125 if scaled != "Div(m, c)" else 8.0
    feeds = _score_feeds()
    before = quantize(_scores(scaled, c), feeds)
    after = quantize(_scores(scaled, c), feeds)
    ops = count_ops(after)
    assert _fold(after)
    assert count_ops(after)[scaled[:3]] == ops[scaled[:3]] - 1
    onnx.checker.check_model(to_proto(after), full_check=True)
    # The same numbers as the Mul computed (float rounding of s·c aside).
    assert_numerically_close(before, after, feeds[0], rtol=1e-5, atol_rel=1e-6)
    # One DequantizeLinear carries s·c; its QuantizeLinear keeps s.
    scales = sorted(float(v.const_value.numpy()) for v in after.graph.initializers.values() if v.name.endswith("_folded"))
    assert len(scales) == 1
    # The MatMul output now holds what the Mul output held, under its name.
    assert next(n for n in after.graph if n.op_type == "MatMul").outputs[0].name == "s"
    # onnxruntime still fuses the MatMul, now with no kernel after it.
    optimized = count_ops(optimized_graph(to_proto(after)))
    assert optimized["MatMulIntegerToFloat"] == 1 and optimized["Mul"] == optimized["Div"] == 0
    assert check_fusion(to_proto(after)).fused


@pytest.mark.parametrize("bias", [True, False])
def test_dynamic_form_takes_the_scale_in_its_weight_scale_and_bias(bias):
    feeds = [{"x": rng.normal(size=(2, 5, 16)).astype(np.float32)} for _ in range(6)]
    before, after = (quantize(_projection(bias), feeds) for _ in range(2))
    for model in (before, after):
        QuantizeDynamicMatMulPass()(model)
        common_passes.RemoveUnusedNodesPass()(model)
    assert _fold(after)
    assert count_ops(after)["Mul"] == count_ops(before)["Mul"] - 1
    assert_numerically_close(before, after, feeds[0], rtol=1e-5, atol_rel=1e-6)
    optimized = count_ops(optimized_graph(to_proto(after)))
    assert optimized["DynamicQuantizeMatMul"] == 1 and optimized["Mul"] == 0 and optimized["Add"] == 0
    assert check_fusion(to_proto(after)).fused


@pytest.mark.parametrize("c", [-0.125, 0.0, float("inf")])
def test_non_positive_or_infinite_constants_stay(c):
    model = quantize(_scores("Mul(m, c)", c), _score_feeds())
    assert not _fold(model) and count_ops(model)["Mul"] == 1


def test_a_vector_constant_stays():
    text = SCORES.replace("{scaled}", "Mul(m, c)")
    model = quantize(parse_model(text, {"c": rng.uniform(0.5, 1.0, size=5).astype(np.float32)}), _score_feeds())
    assert not _fold(model) and count_ops(model)["Mul"] == 1


def test_a_float_matmul_is_not_touched():
    """No DequantizeLinear input: the pass leaves float MatMuls to onnxruntime's own folding."""
    model = _scores()
    assert not _fold(model) and count_ops(model)["Mul"] == 1


def test_second_reader_of_the_matmul_output_blocks_the_fold():
    text = SCORES.replace("=> (float[2,5,5] y)", "=> (float[2,5,5] y, float[2,5,5] r)").replace(
        "y = Softmax", "r = Relu(m)\n  y = Softmax").replace("{scaled}", "Mul(m, c)")
    model = quantize(parse_model(text, {"c": np.array(0.125, dtype=np.float32)}), _score_feeds())
    muls = count_ops(model)["Mul"]
    assert not _fold(model) and count_ops(model)["Mul"] == muls


def test_graph_output_and_shared_dequantize_are_declined_with_a_note():
    # s is a graph output: removing its Mul would change the output's name.
    text = SCORES.replace("=> (float[2,5,5] y)", "=> (float[2,5,5] y, float[2,5,5] s)").replace("{scaled}", "Mul(m, c)")
    model = quantize(parse_model(text, {"c": np.array(0.125, dtype=np.float32)}), _score_feeds())
    assert not _fold(model)
    assert any("fold_matmul_scale declined" in n and "graph output" in n for n in notes(model))


def test_dequantize_read_by_two_matmuls_is_declined_with_a_note():
    text = """<ir_version: 8, opset_import: ["" : 17]>
    g (float[2,5,8] q, float[2,8,5] k) => (float[2,5,5] y) {
      m = MatMul(q, k)
      n = MatMul(q, k)
      s = Mul(m, c)
      t = Add(s, n)
      y = Softmax <axis=-1> (t)
    }"""
    feeds = _score_feeds()
    model = quantize(parse_model(text, {"c": np.array(0.125, dtype=np.float32)}), feeds)
    dq_readers = [len(list(n.outputs[0].uses())) for n in model.graph if n.op_type == "DequantizeLinear"]
    if min(dq_readers) < 2:
        pytest.skip("placement gave each MatMul its own DequantizeLinear")
    reference = run(model, feeds[0])
    assert not _fold(model)
    assert any("read elsewhere" in n for n in notes(model))
    np.testing.assert_array_equal(run(model, feeds[0])[0], reference[0])


@pytest.mark.parametrize("target", ["cpu", "tensorrt"])
def test_pipeline_folds_for_onnxruntime_cpu_only(target):
    """TensorRT pairs each DequantizeLinear with its QuantizeLinear: its compile keeps the Mul."""
    options = qcompile.CompileOptions(target=target, verification=qcompile.VerificationOptions(enabled=False), show_progress=False)
    result = qcompile.compile_model(to_proto(_scores()), _score_feeds(), options)
    ran = {r.name: r.modified for r in result.report.passes}
    if target == "cpu":
        assert ran["fold_matmul_scale"] and count_ops(result.model)["Mul"] == 0
    else:
        assert "fold_matmul_scale" not in ran and count_ops(result.model)["Mul"] == 1


# q scaled before q·kᵀ (timm's ViT; torch's scaled_dot_product_attention export scales q and kᵀ),
# through a head reshape.
SCALED_INPUT = """<ir_version: 8, opset_import: ["" : 17]>
g (float[2,5,2,4] q, float[2,8,5] k) => (float[2,5,5] y{extra}) {
  qs = Mul(q, c)
  qr = Reshape(qs, shape)
  m = MatMul(qr, k)
  y = Softmax <axis=-1> (m)
}"""


SCALED_FEEDS = [{"q": rng.normal(size=(2, 5, 2, 4)).astype(np.float32), "k": rng.normal(size=(2, 8, 5)).astype(np.float32)}
                for _ in range(6)]


def _scaled_input(extra=""):
    text = SCALED_INPUT.replace("{extra}", extra)
    inits = {"c": np.array(0.25, dtype=np.float32), "shape": np.array([2, 5, 8])}
    return quantize(parse_model(text, inits), SCALED_FEEDS), SCALED_FEEDS


def test_a_scale_on_a_matmul_input_goes_into_its_quantize_scale():
    before, feeds = _scaled_input()
    after, _ = _scaled_input()
    assert count_ops(after)["Mul"] == 1
    assert _fold(after)
    assert count_ops(after)["Mul"] == 0
    onnx.checker.check_model(to_proto(after), full_check=True)
    # Q(q·c, s) = Q(q, s/c): the same integers, so the DequantizeLinear keeps s.
    assert_numerically_close(before, after, feeds[0], rtol=1e-5, atol_rel=1e-6)
    quant = next(n for n in after.graph if n.op_type == "QuantizeLinear" and n.inputs[0].name == "qr")
    scale = quant.inputs[1]
    assert scale.name.endswith("_folded")
    dq = next(use.node for use in quant.outputs[0].uses())
    np.testing.assert_allclose(scale.const_value.numpy(), dq.inputs[1].const_value.numpy() / 0.25, rtol=1e-6)
    assert any("into the scale of" in n for n in notes(after))


def test_a_scaled_input_read_elsewhere_stays():
    # qs is also a graph output: the float tensor must keep its values.
    model, _ = _scaled_input(", float[2,5,2,4] qs")
    assert not _fold(model) and count_ops(model)["Mul"] == 1
