"""The fusion check: fused int8 kernels, unfused ops between DQ and Q, float-by-decision boundaries."""

import dataclasses

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

import qcompile
from qcompile.passes import op_rules
from qcompile.verify.fusion import check_fusion
from tests.helpers import parse_model, to_proto
from tests.passes.test_annotate import conv_relu_pool_gemm
from tests.quant_helpers import quantize

rng = np.random.default_rng(0)


def _feeds(shape, n=4):
    return [{"x": rng.normal(size=shape).astype(np.float32)} for _ in range(n)]


def test_quantized_conv_net_is_fully_fused():
    model = quantize(conv_relu_pool_gemm(), _feeds((2, 3, 8, 8)))
    report = check_fusion(to_proto(model))
    assert report.fused and report.unfused_ops == {}
    assert report.kernels == {"QLinearConv": 1, "QGemm": 1}
    # Only the input's QuantizeLinear is left: the Gemm returns float.
    assert (report.quantize_nodes, report.dequantize_nodes) == (1, 0)


def _dq_erf_q() -> onnx.ModelProto:
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
        helper.make_node("Erf", ["xd"], ["e"], name="the_erf"),
        helper.make_node("QuantizeLinear", ["e", "s", "z"], ["eq"]),
        helper.make_node("DequantizeLinear", ["eq", "s", "z"], ["y"]),
    ]
    inits = [numpy_helper.from_array(np.float32(0.02), "s"), numpy_helper.from_array(np.uint8(128), "z")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", 1, [1, 8])], [helper.make_tensor_value_info("y", 1, [1, 8])], inits
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_an_op_without_int8_kernel_between_dq_and_q_is_unfused_only_if_quantized_by_decision():
    report = check_fusion(_dq_erf_q())
    assert not report.fused and report.unfused_ops == {"Erf": 1} and report.unfused_nodes == ("the_erf",)
    assert "NOT FUSED" in report.summary()
    report = check_fusion(_dq_erf_q(), quantized_by_decision=frozenset({"the_erf"}))
    assert not report.fused and report.unfused_ops == {"Erf": 1}
    report = check_fusion(_dq_erf_q(), quantized_by_decision=frozenset({"something_else"}))
    assert report.fused and report.float_between == {"Erf": 1}


HARD_SIGMOID = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N,4,5,5] x) => (float[N,4,5,5] y) {
  a = Conv (x, w1)
  b = HardSigmoid(a)
  y = Conv (b, w2)
}"""


def _hard_sigmoid_model() -> onnx.ModelProto:
    inits = dict(w1=rng.normal(size=(4, 4, 1, 1)).astype(np.float32), w2=rng.normal(size=(4, 4, 1, 1)).astype(np.float32))
    return to_proto(parse_model(HARD_SIGMOID, inits))


def test_compile_reports_fusion_and_keeps_ops_without_kernels_float():
    result = qcompile.compile_model(_hard_sigmoid_model(), _feeds((2, 4, 5, 5), 6), qcompile.CompileOptions(show_progress=False))
    fusion = result.report.fusion
    assert fusion["fused"] and fusion["float_by_decision_between_qdq"] == {"HardSigmoid": 1}
    reasons = [n.reason for n in result.report.quantization.float_nodes]
    assert any("no int8 HardSigmoid kernel" in r for r in reasons)


def test_strict_fusion_fails_when_a_quantized_op_is_not_fused(monkeypatch):
    # Pretend onnxruntime had an int8 HardSigmoid: the compiler quantizes it, onnxruntime cannot fuse it.
    rule = dataclasses.replace(op_rules.OP_RULES["HardSigmoid"], int8_kernel=True)
    monkeypatch.setitem(op_rules.OP_RULES, "HardSigmoid", rule)
    options = qcompile.CompileOptions(show_progress=False, verification=qcompile.VerificationOptions(strict_fusion=True))
    result = qcompile.compile_model(_hard_sigmoid_model(), _feeds((2, 4, 5, 5), 6), options)
    assert result.report.fusion["unfused_ops"] == {"HardSigmoid": 1}
    assert not result.verification_passed and "strict fusion" in result.failure
    relaxed = qcompile.CompileOptions(show_progress=False)
    assert qcompile.compile_model(_hard_sigmoid_model(), _feeds((2, 4, 5, 5), 6), relaxed).verification_passed


@pytest.mark.parametrize("op", ["Sigmoid", "LeakyRelu", "Add", "Concat", "Resize", "Transpose", "AveragePool"])
def test_op_table_ops_fuse_on_cpu(op):
    """Each op the table quantizes, between two Convs, ends in an int8 kernel (or its Q/DQ pair is dropped)."""
    body = {
        "Sigmoid": "b = Sigmoid(a)",
        "LeakyRelu": "b = LeakyRelu(a)",
        "Add": "a2 = Conv (x, w3)\n b = Add(a, a2)",
        "Concat": "a2 = Conv (x, w3)\n c = Concat <axis=1> (a, a2)\n b = Slice(c, s0, s1, ax)",
        "Resize": 't = Resize <mode="nearest"> (a, , sc)\n b = MaxPool <kernel_shape=[2,2], strides=[2,2]> (t)',
        "Transpose": "t = Transpose <perm=[0,1,3,2]> (a)\n b = Transpose <perm=[0,1,3,2]> (t)",
        "AveragePool": "b = AveragePool <kernel_shape=[3,3], pads=[1,1,1,1]> (a)",
    }[op]
    text = f"""<ir_version: 8, opset_import: ["" : 17]>
    g (float[N,4,6,6] x) => (float[N,4,6,6] y) {{
      a = Conv (x, w1, b1)
      {body}
      y = Conv (b, w2, b2)
    }}"""
    arrays = dict(
        w1=rng.normal(size=(4, 4, 1, 1)), w2=rng.normal(size=(4, 4, 1, 1)), w3=rng.normal(size=(4, 4, 1, 1)),
        b1=rng.normal(size=4), b2=rng.normal(size=4), sc=np.array([1, 1, 2, 2.0]),
    )
    inits = {k: v.astype(np.float32) for k, v in arrays.items() if k in text}
    inits.update({k: np.array(v, np.int64) for k, v in dict(s0=[0], s1=[4], ax=[1]).items() if k in text})
    model = quantize(parse_model(text, inits), _feeds((2, 4, 6, 6)))
    report = check_fusion(to_proto(model))
    assert report.fused, report.summary()
    assert report.kernels["QLinearConv"] >= 2


def test_a_standalone_matmul_integer_is_unfused():
    """MatMulInteger whose int32 result is not scaled by the Mul onnxruntime matches: Cast and Mul run in float."""
    nodes = [
        helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"]),
        helper.make_node("MatMulInteger", ["xq", "w", "xz"], ["acc"], name="the_matmul"),
        helper.make_node("Cast", ["acc"], ["accf"], to=onnx.TensorProto.FLOAT),
        helper.make_node("Mul", ["accf", "ws"], ["y"]),  # not Mul(·, Mul(x scale, w scale)): no fusion
    ]
    inits = [
        numpy_helper.from_array(rng.integers(-127, 128, size=(8, 4)).astype(np.int8), "w"),
        numpy_helper.from_array(np.float32(0.01), "ws"),
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", 1, [3, 8])], [helper.make_tensor_value_info("y", 1, [3, 4])], inits
    )
    report = check_fusion(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert not report.fused and report.unfused_ops == {"MatMulInteger": 1} and report.unfused_nodes == ("the_matmul",)


def _int4_model(after_matmul: str, monkeypatch) -> onnx.ModelProto:
    """x → MatMul(int4 weight) → ``after_matmul``; the int4 pass forced (its decline rule off)."""
    from qcompile.passes import quantize_int4_weights as int4
    from tests.passes.test_quantize_int4_weights import _after_matmul, _matmul_names

    model = _after_matmul("", after_matmul)
    with monkeypatch.context() as patch:
        patch.setattr(int4, "matmulnbits_blocker", lambda node: None)
        assert int4.QuantizeInt4WeightsPass(_matmul_names(model))(model).modified
    return to_proto(model)


def test_a_fused_int4_matmul_counts_as_fused(monkeypatch):
    report = check_fusion(_int4_model("y = Sigmoid (m)", monkeypatch))
    assert report.fused and report.unfused_int4_weights == {}
    assert report.kernels == {"MatMulNBits": 1}
    assert report.to_json()["unfused_int4_weights"] == {}


def test_an_unfused_int4_matmul_is_reported_with_the_reason(monkeypatch):
    # A lone Relu after the MatMul: onnxruntime 1.32 leaves DequantizeLinear → MatMul in float.
    report = check_fusion(_int4_model("r = Relu (m)\n y = Sigmoid (r)", monkeypatch))
    assert not report.fused and report.unfused_ops == {}
    assert list(report.unfused_int4_weights) == ["node"]  # the MatMul, as NameFixPass named it
    assert "goes only into a Relu" in report.unfused_int4_weights["node"]
    assert report.dequantize_nodes == 1 and "MatMulNBits" not in report.kernels
    summary = report.summary()
    assert "NOT FUSED, 1 int4 weight(s) dequantized to float every run" in summary and "Relu" in summary


def test_an_int4_matmul_onnxruntime_folded_into_fused_gemm_is_reported(monkeypatch):
    report = check_fusion(_int4_model("b = Add (m, bias)\n r = Relu (b)\n y = Sigmoid (r)", monkeypatch))
    assert not report.fused
    (reason,) = report.unfused_int4_weights.values()
    assert "FusedGemm" in reason


def test_strict_fusion_fails_on_an_unfused_int4_matmul(monkeypatch):
    """int4 forced where onnxruntime does not fuse it: the compile reports it, and strict fusion fails."""
    from qcompile.options import PrecisionOptions
    from qcompile.passes import quantize_int4_weights as int4
    from tests.precision.models import chain, feeds

    monkeypatch.setattr(int4, "matmulnbits_blocker", lambda node: None)
    precision = PrecisionOptions(precision=("mm2=int4",))
    strict = qcompile.CompileOptions(
        show_progress=False, precision=precision, verification=qcompile.VerificationOptions(strict_fusion=True)
    )
    result = qcompile.compile_model(chain(), feeds(), strict)
    assert set(result.report.fusion["unfused_int4_weights"]) == {"mm2"}
    assert not result.verification_passed and "int4 weight(s) dequantized" in result.failure
    monkeypatch.undo()  # with the rule: declined, so nothing unfused
    result = qcompile.compile_model(chain(), feeds(), strict)
    assert result.verification_passed and result.report.fusion["unfused_int4_weights"] == {}
    reasons = {n.name: n.reason for n in result.report.quantization.float_nodes}
    assert reasons["mm2"].startswith("kept float, int4 declined: its output goes only into a Relu")
