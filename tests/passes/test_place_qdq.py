"""PlaceQDQPass (with annotation, calibration and bias derivation before it): numbers and op counts."""

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from qcompile.options import SchemeOptions
from tests.helpers import count_ops, parse_model, run, sqnr_db, to_proto
from tests.passes.test_annotate import CONV_RELU_POOL_GEMM
from tests.quant_helpers import quantize

rng = np.random.default_rng(0)


def _inits():
    return dict(
        w=rng.normal(size=(4, 3, 3, 3)).astype(np.float32),
        b=rng.normal(size=4).astype(np.float32),
        fw=rng.normal(size=(10, 64)).astype(np.float32),
        fb=rng.normal(size=10).astype(np.float32),
    )


def _feeds(n=8, shape=(2, 3, 8, 8)):
    return [{"x": rng.normal(size=shape).astype(np.float32)} for _ in range(n)]


def _fused_ops(model) -> dict:
    """The op counts after onnxruntime's graph optimizations (what really runs)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.log_severity_level = 3
    import tempfile, os

    with tempfile.TemporaryDirectory() as tmp:
        so.optimized_model_filepath = os.path.join(tmp, "opt.onnx")
        ort.InferenceSession(to_proto(model).SerializeToString(), so, providers=["CPUExecutionProvider"])
        return count_ops(onnx.load(so.optimized_model_filepath))


@pytest.mark.parametrize("activation_dtype", ["uint8", "int8"])
def test_conv_relu_pool_gemm_quantized_close_to_float_and_fused(activation_dtype):
    inits = _inits()
    float_model = parse_model(CONV_RELU_POOL_GEMM, inits)
    model = quantize(parse_model(CONV_RELU_POOL_GEMM, inits), _feeds(), SchemeOptions(activation_dtype=activation_dtype))
    onnx.checker.check_model(to_proto(model), full_check=True)
    ops = count_ops(model)
    # x, the Relu output and its two shared-qparams followers; 2 weights + 2 biases + 4 activations.
    assert ops["QuantizeLinear"] == 4
    assert ops["DequantizeLinear"] == 8
    # Weights and biases are stored as integers (not counting scales and zero points).
    data = {v.name: v.dtype for v in model.graph.initializers.values() if v.name.endswith("_quantized")}
    assert sorted(data.values()) == sorted([ir.DataType.INT8] * 2 + [ir.DataType.INT32] * 2)
    x = _feeds(1, (16, 3, 8, 8))[0]
    ref, quant = run(float_model, x)[0], run(model, x)[0]
    assert sqnr_db(ref, quant) > 30
    fused = _fused_ops(model)
    assert fused["QLinearConv"] == 1 and fused["QGemm"] == 1
    assert fused["Relu"] == 0 and fused["DequantizeLinear"] == 0


def test_weights_round_trip_within_half_a_step():
    inits = _inits()
    model = quantize(parse_model(CONV_RELU_POOL_GEMM, inits), _feeds())
    dq = next(n for n in model.graph if n.op_type == "DequantizeLinear" and n.inputs[0].dtype == ir.DataType.INT8
              and n.inputs[0].shape.dims == (4, 3, 3, 3))
    q = dq.inputs[0].const_value.numpy().astype(np.float32)
    scale = dq.inputs[1].const_value.numpy()
    assert dq.attributes["axis"].value == 0 and scale.shape == (4,)
    restored = q * scale[:, None, None, None]
    assert np.all(np.abs(restored - inits["w"]) <= scale[:, None, None, None] / 2 + 1e-7)
    # Symmetric per channel: the largest |w| of each channel maps to ±127.
    assert np.all(np.abs(q).reshape(4, -1).max(axis=1) == 127)


def test_graph_output_keeps_its_name_when_quantized():
    text = """<ir_version: 8, opset_import: ["" : 17]>
    g (float[N,3,6,6] x) => (float[N,4,6,6] y) {
      y = Conv <pads=[1,1,1,1]> (x, w, b)
    }"""
    inits = dict(w=rng.normal(size=(4, 3, 3, 3)).astype(np.float32), b=rng.normal(size=4).astype(np.float32))
    model = quantize(parse_model(text, inits), _feeds(shape=(1, 3, 6, 6)))
    assert [o.name for o in model.graph.outputs] == ["y"]
    assert model.graph.outputs[0].producer().op_type == "DequantizeLinear"
    x = _feeds(1, (4, 3, 6, 6))[0]
    assert sqnr_db(run(parse_model(text, inits), x)[0], run(model, x)[0]) > 30
    assert _fused_ops(model)["QLinearConv"] == 1


def test_add_with_constant_and_concat_share_scale():
    text = """<ir_version: 8, opset_import: ["" : 17]>
    g (float[N,4,5,5] x) => (float[N,4,5,5] y) {
      a = Conv (x, w1)
      b = Sigmoid(x)
      c = Concat <axis=1> (a, b)
      s = Add(c, k)
      y = Conv (s, w2)
    }"""
    inits = dict(
        w1=rng.normal(size=(4, 4, 1, 1)).astype(np.float32), k=rng.normal(size=(1, 8, 1, 1)).astype(np.float32),
        w2=rng.normal(size=(4, 8, 1, 1)).astype(np.float32),
    )
    model = quantize(parse_model(text, inits), _feeds(shape=(2, 4, 5, 5)))
    q_nodes = [n for n in model.graph if n.op_type == "QuantizeLinear"]
    by_tensor = {n.inputs[0].name: n for n in q_nodes}
    # Concat's inputs and output use the same scale initializer.
    assert by_tensor["a"].inputs[1] is by_tensor["b"].inputs[1] is by_tensor["c"].inputs[1]
    # The constant operand of Add is stored as uint8 (activation type, per tensor).
    assert any(v.dtype == ir.DataType.UINT8 and v.shape.dims == (1, 8, 1, 1) for v in model.graph.initializers.values())
    x = _feeds(1, (8, 4, 5, 5))[0]
    # One scale for a Conv output and a Sigmoid output costs the Sigmoid resolution: > 25 dB, not 30.
    assert sqnr_db(run(parse_model(text, inits), x)[0], run(model, x)[0]) > 25


# Two projections of x and their product: attention's Q·Kᵀ in miniature.
ATTENTION_SCORES = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N,6,16] x) => (float[N,6,6] y) {
  q = MatMul(x, wq)
  k = MatMul(x, wk)
  kt = Transpose <perm=[0,2,1]> (k)
  y = MatMul(q, kt)
}"""


def test_matmul_with_activation_operands_and_weight():
    text = ATTENTION_SCORES
    inits = dict(wq=rng.normal(size=(16, 16)).astype(np.float32), wk=rng.normal(size=(16, 16)).astype(np.float32))
    model = quantize(parse_model(text, inits), _feeds(shape=(1, 6, 16)))
    dq_weights = [n for n in model.graph if n.op_type == "DequantizeLinear" and n.inputs[0].dtype == ir.DataType.INT8]
    assert len(dq_weights) == 2 and all(n.attributes["axis"].value == 1 for n in dq_weights)
    x = _feeds(1, (4, 6, 16))[0]
    assert sqnr_db(run(parse_model(text, inits), x)[0], run(model, x)[0]) > 25


EMBEDDING = """<ir_version: 8, opset_import: ["" : 17]>
g (int64[N,5] ids) => (float[N,5,8] y) {
  e = Gather (table, ids)
  y = MatMul(e, w)
}"""


def test_embedding_table_is_stored_in_int8_and_the_lookup_shares_its_qparams():
    from qcompile.passes.annotate import MIN_LOOKUP_TABLE_BYTES
    from qcompile.verify.fusion import check_fusion

    local = np.random.default_rng(3)
    rows = MIN_LOOKUP_TABLE_BYTES // (16 * 4)  # the smallest table stored in 8 bits
    inits = dict(table=local.normal(size=(rows, 16)).astype(np.float32), w=local.normal(size=(16, 8)).astype(np.float32))
    feeds = [{"ids": local.integers(0, rows, size=(2, 5)).astype(np.int64)} for _ in range(4)]
    model = quantize(parse_model(EMBEDDING, inits), feeds)
    tables = [v for v in model.graph.initializers.values() if v.shape is not None and v.shape.dims == (rows, 16)]
    assert len(tables) == 1 and tables[0].dtype == ir.DataType.UINT8
    dq_table = next(u.node for u in tables[0].uses())
    q_out = next(n for n in model.graph if n.op_type == "QuantizeLinear" and n.inputs[0].name == "e")
    for i in (1, 2):  # the same scale and zero point values
        np.testing.assert_array_equal(dq_table.inputs[i].const_value.numpy(), q_out.inputs[i].const_value.numpy())
    x = {"ids": local.integers(0, rows, size=(3, 5)).astype(np.int64)}
    assert sqnr_db(run(parse_model(EMBEDDING, inits), x)[0], run(model, x)[0]) > 30
    report = check_fusion(to_proto(model))
    assert report.fused and report.dequantize_nodes <= 2  # the gathered rows are dequantized, not the table


def test_a_small_lookup_table_stays_float():
    from qcompile.quant.spec import DECISION_KEY

    local = np.random.default_rng(3)
    inits = dict(table=local.normal(size=(50, 16)).astype(np.float32), w=local.normal(size=(16, 8)).astype(np.float32))
    feeds = [{"ids": local.integers(0, 50, size=(2, 5)).astype(np.int64)} for _ in range(4)]
    model = quantize(parse_model(EMBEDDING, inits), feeds)
    gather = next(n for n in model.graph if n.op_type == "Gather")
    assert not gather.meta[DECISION_KEY].quantized and "KiB" in gather.meta[DECISION_KEY].reason
    assert model.graph.initializers["table"].dtype == ir.DataType.FLOAT
    # The lookup is exact; only the MatMul rounds (its input e gets a Q/DQ pair).
    assert count_ops(model)["QuantizeLinear"] == 1
    x = {"ids": local.integers(0, 50, size=(3, 5)).astype(np.int64)}
    assert sqnr_db(run(parse_model(EMBEDDING, inits), x)[0], run(model, x)[0]) > 30


def test_bias_add_after_matmul_stays_float_for_the_float_output_kernel():
    from qcompile.verify.fusion import check_fusion

    text = """<ir_version: 8, opset_import: ["" : 17]>
    g (float[N,6,16] x) => (float[N,6,8] y) {
      m = MatMul(x, w1)
      a = Add(m, b1)
      y = MatMul(a, w2)
    }"""
    local = np.random.default_rng(4)
    inits = dict(
        w1=local.normal(size=(16, 16)).astype(np.float32), b1=local.normal(size=16).astype(np.float32),
        w2=local.normal(size=(16, 8)).astype(np.float32),
    )
    feeds = [{"x": local.normal(size=(2, 6, 16)).astype(np.float32)} for _ in range(4)]
    model = quantize(parse_model(text, inits), feeds)
    ops = count_ops(model)
    assert ops["QuantizeLinear"] == 2  # x and a: the MatMul output m is not rounded
    report = check_fusion(to_proto(model))
    assert report.fused and report.kernels.get("MatMulIntegerToFloat", 0) >= 1
    x = {"x": local.normal(size=(3, 6, 16)).astype(np.float32)}
    assert sqnr_db(run(parse_model(text, inits), x)[0], run(model, x)[0]) > 30


# A transformer block's seam: LayerNormalization (float) feeds a MatMul (int8) and the residual Add (float).
LN_RESIDUAL = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N,6,16] x) => (float[N,6,16] y, float[N,6,16] h) {
  h = LayerNormalization <axis=-1> (x, gamma, beta)
  m = MatMul(h, w)
  y = Add(m, h)
}"""


def test_float_readers_of_a_float_op_output_keep_the_exact_tensor():
    from qcompile.verify.fusion import check_fusion

    local = np.random.default_rng(5)
    inits = dict(
        gamma=local.uniform(0.5, 1.5, size=16).astype(np.float32), beta=local.normal(size=16).astype(np.float32),
        w=local.normal(scale=0.1, size=(16, 16)).astype(np.float32),
    )
    feeds = [{"x": local.normal(size=(2, 6, 16)).astype(np.float32)} for _ in range(4)]
    model = quantize(parse_model(LN_RESIDUAL, inits), feeds)
    ops = count_ops(model)
    assert ops["QuantizeLinear"] == 1 and ops["DequantizeLinear"] == 2  # h for the MatMul; the weight
    h = next(n for n in model.graph if n.op_type == "LayerNormalization").outputs[0]
    readers = sorted(u.node.op_type for u in h.uses())
    assert readers == ["Add", "QuantizeLinear"]  # the residual Add reads the exact h, not its rounded copy
    assert [o.name for o in model.graph.outputs] == ["y", "h"] and model.graph.outputs[1] is h
    x = {"x": local.normal(size=(3, 6, 16)).astype(np.float32)}
    ref, out = run(parse_model(LN_RESIDUAL, inits), x), run(model, x)
    np.testing.assert_array_equal(out[1], ref[1])  # the graph output h is exact
    # The placement before this rule: the Add read the rounded copy. It is measurably worse.
    rounded = ir.from_proto(to_proto(model))
    add = next(n for n in rounded.graph if n.op_type == "Add")
    add.replace_input_with(1, next(n for n in rounded.graph if n.op_type == "DequantizeLinear" and n.inputs[0].dtype == ir.DataType.UINT8).outputs[0])
    assert sqnr_db(ref[0], out[0]) > sqnr_db(ref[0], run(rounded, x)[0]) + 3
    report = check_fusion(to_proto(model))
    assert report.fused and report.kernels.get("MatMulIntegerToFloat", 0) == 1


@pytest.mark.parametrize("quantize_activation_matmuls", [True, False])
def test_activation_matmul_int8_by_default_and_float_on_request(quantize_activation_matmuls):
    from qcompile.quant.spec import DECISION_KEY
    from qcompile.verify.fusion import check_fusion

    text = ATTENTION_SCORES
    local = np.random.default_rng(6)
    inits = dict(wq=local.normal(size=(16, 16)).astype(np.float32), wk=local.normal(size=(16, 16)).astype(np.float32))
    scheme = SchemeOptions(quantize_activation_matmuls=quantize_activation_matmuls)
    model = quantize(parse_model(text, inits), _feeds(shape=(1, 6, 16)), scheme)
    attention = next(n for n in model.graph if n.op_type == "MatMul" and n.outputs[0].name == "y")
    decision = attention.meta[DECISION_KEY]
    assert decision.quantized == quantize_activation_matmuls
    # int8: x, q, k and kt (k and kt share qparams through the Transpose); float: x only.
    assert count_ops(model)["QuantizeLinear"] == (4 if quantize_activation_matmuls else 1)
    kernels = check_fusion(to_proto(model)).kernels
    # Three int8 MatMuls (q and k end in QuantizeLinear: QLinearMatMul), or the two weight MatMuls.
    assert kernels.get("MatMulIntegerToFloat", 0) + kernels.get("QLinearMatMul", 0) == 2 + quantize_activation_matmuls
    if not quantize_activation_matmuls:
        assert "quantize_activation_matmuls" in decision.reason
    x = _feeds(1, (4, 6, 16))[0]
    assert sqnr_db(run(parse_model(text, inits), x)[0], run(model, x)[0]) > 20
