"""QuantizeInt4WeightsPass: blockwise int4 weights that onnxruntime fuses into MatMulNBits."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
import pytest

from qcompile.errors import UsageError
from qcompile.graph.notes import notes
from qcompile.passes.quantize_int4_weights import (
    INT4_MAX,
    INT4_MIN,
    QuantizeInt4WeightsPass,
    dequantize_blockwise,
    quantize_blockwise_int4,
)
from qcompile.verify.fusion import optimized_graph
from tests.helpers import count_ops, parse_model, run, sqnr_db

LN_MATMUL = """<ir_version: 8, opset_import: ["" : 17]>
g (float[B, 8, {k}] x) => (float[B, 8, 48] y) {{
  h = LayerNormalization <axis=-1> (x, gamma, beta)
  y = MatMul (h, w)
}}"""


def _model(k: int = 64, seed: int = 0) -> tuple[ir.Model, np.ndarray]:
    rng = np.random.default_rng(seed)
    weight = rng.normal(size=(k, 48)).astype(np.float32)
    model = parse_model(
        LN_MATMUL.format(k=k),
        {"gamma": np.ones(k, np.float32), "beta": np.zeros(k, np.float32), "w": weight},
    )
    common_passes.NameFixPass()(model)
    return model, weight


def _matmul_names(model: ir.Model) -> list[str]:
    return [n.name for n in model.graph if n.op_type == "MatMul"]


def test_blockwise_values_in_range_and_scales_per_block():
    weight = np.random.default_rng(1).normal(size=(40, 5)).astype(np.float32)  # K not a multiple of 32
    q, scale = quantize_blockwise_int4(weight, 32)
    assert q.shape == weight.shape and q.dtype == np.int8
    assert q.min() >= INT4_MIN and q.max() <= INT4_MAX
    assert scale.shape == (2, 5)
    # Every element is within half a step of its block's scale, or clipped by at most 30%.
    restored = dequantize_blockwise(q, scale, 32)
    step = np.repeat(scale, 32, axis=0)[:40]
    assert np.all(np.abs(restored - weight) <= np.maximum(0.5 * step, 0.3 * np.abs(weight)) + 1e-6)


def test_clipping_search_is_never_worse_than_plain_max():
    rng = np.random.default_rng(2)
    weight = rng.standard_t(df=3, size=(256, 16)).astype(np.float32)  # heavy tails: clipping pays
    q, scale = quantize_blockwise_int4(weight, 32)
    searched_error = np.sum((dequantize_blockwise(q, scale, 32) - weight) ** 2)
    blocks = weight.reshape(8, 32, 16)
    plain_scale = np.abs(blocks).max(axis=1) / INT4_MAX
    plain_q = np.clip(np.round(blocks / plain_scale[:, None, :]), INT4_MIN, INT4_MAX)
    plain_error = np.sum((plain_q * plain_scale[:, None, :] - blocks) ** 2)
    assert searched_error < plain_error


def test_rewrite_matches_its_own_math_and_fuses_into_matmulnbits():
    model, weight = _model()
    reference = ir.to_proto(model)
    result = QuantizeInt4WeightsPass(_matmul_names(model))(model)
    assert result.modified
    proto = ir.to_proto(model)
    onnx.checker.check_model(proto, full_check=True)
    assert model.opset_imports[""] == 21
    assert count_ops(proto) == {"LayerNormalization": 1, "DequantizeLinear": 1, "MatMul": 1}
    dq = next(n for n in proto.graph.node if n.op_type == "DequantizeLinear")
    attrs = {a.name: a.i for a in dq.attribute}
    assert attrs == {"axis": 0, "block_size": 32}
    stored = {t.name: t for t in proto.graph.initializer}
    assert stored[dq.input[0]].data_type == onnx.TensorProto.INT4
    assert "w" not in stored  # the float weight is gone

    x = np.random.default_rng(3).normal(size=(2, 8, 64)).astype(np.float32)
    float_out = run(reference, {"x": x})[0]
    int4_out = run(proto, {"x": x})[0]
    # onnxruntime's DequantizeLinear(block_size) agrees with our blockwise math.
    q, scale = quantize_blockwise_int4(weight, 32)
    h = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)  # the LayerNorm, γ=1, β=0
    np.testing.assert_allclose(int4_out, h @ dequantize_blockwise(q, scale, 32), rtol=1e-4, atol=1e-4)
    assert sqnr_db(float_out, int4_out) > 15.0
    # What onnxruntime runs: one MatMulNBits, no DequantizeLinear left.
    assert [n.op_type for n in optimized_graph(proto).graph.node] == ["LayerNormalization", "MatMulNBits"]
    assert proto.ByteSize() < reference.ByteSize() / 4
    assert any("upgraded from opset 17 to 21" in note for note in notes(model))


def test_max_opset_below_21_is_refused():
    model, _ = _model()
    with pytest.raises(UsageError, match="opset 21"):
        QuantizeInt4WeightsPass(_matmul_names(model), max_opset=20)(model)


def test_block_size_must_suit_matmulnbits():
    with pytest.raises(UsageError, match="power of two"):
        QuantizeInt4WeightsPass(["x"], block_size=24)
    with pytest.raises(UsageError, match="power of two"):
        QuantizeInt4WeightsPass(["x"], block_size=8)


def test_nodes_that_do_not_qualify_are_declined_with_a_reason():
    text = """<ir_version: 8, opset_import: ["" : 17]>
    g (float[2, 16] a, float[16, 4] b) => (float[2, 4] y, float[2, 4] z) {
      y = MatMul (a, b)
      z = Gemm (a, w)
    }"""
    model = parse_model(text, {"w": np.ones((16, 4), np.float32)})
    common_passes.NameFixPass()(model)
    before = ir.to_proto(model).SerializeToString()
    result = QuantizeInt4WeightsPass([n.name for n in model.graph])(model)
    assert not result.modified
    assert ir.to_proto(model).SerializeToString() == before
    text_notes = " ".join(notes(model))
    assert "not a constant weight" in text_notes
    assert "Gemm is not a MatMul" in text_notes


def test_unnamed_nodes_are_untouched():
    model, _ = _model()
    before = ir.to_proto(model).SerializeToString()
    assert not QuantizeInt4WeightsPass([])(model).modified
    assert ir.to_proto(model).SerializeToString() == before


# What reads the MatMul's output decides whether onnxruntime (1.32) fuses the int4 weight.
AFTER_MATMUL = """<ir_version: 8, opset_import: ["" : 17]>
g (float[{a}N, 64] x) => (float[{a}N, 16] y) {{
  m = MatMul (x, w)
  {body}
}}"""

FUSES = {
    "a Relu that is the graph output": ("", "y = Relu (m)"),
    "a Relu read twice": ("", "r = Relu (m)\n s = Sigmoid (r)\n t = Tanh (r)\n y = Add (s, t)"),
    "a Sigmoid then a Relu": ("", "s = Sigmoid (m)\n r = Relu (s)\n y = Tanh (r)"),
    "bias Add then Relu on a 3-D input (no Gemm fusion)": ("B, ", "b = Add (m, bias)\n r = Relu (b)\n y = Sigmoid (r)"),
}
DECLINED = {
    "a lone Relu": ("", "r = Relu (m)\n y = Sigmoid (r)", "goes only into a Relu"),
    "a lone Clip": ("", "r = Clip (m)\n y = Sigmoid (r)", "goes only into a Clip"),
    "a QuantizeLinear": ("", "q = QuantizeLinear (m, s, z)\n y = DequantizeLinear (q, s, z)", "is quantized"),
    "bias Add then a lone Relu (Gemm)": ("", "b = Add (m, bias)\n r = Relu (b)\n y = Sigmoid (r)", "its bias Add"),
}


def _after_matmul(rank_prefix: str, body: str) -> ir.Model:
    inits = {
        "w": np.random.default_rng(4).normal(size=(64, 16)).astype(np.float32),
        "bias": np.linspace(-1, 1, 16, dtype=np.float32),
        "s": np.float32(0.05),
        "z": np.uint8(128),
    }
    used = {k: v for k, v in inits.items() if k == "w" or f", {k}" in body}
    model = parse_model(AFTER_MATMUL.format(a=rank_prefix, body=body), used)
    common_passes.ShapeInferencePass()(model)  # the rule reads the MatMul input's rank
    common_passes.NameFixPass()(model)
    return model


@pytest.mark.parametrize("case", sorted(FUSES))
def test_int4_fuses_where_onnxruntime_takes_it(case):
    model = _after_matmul(*FUSES[case])
    assert QuantizeInt4WeightsPass(_matmul_names(model))(model).modified
    ops = [n.op_type for n in optimized_graph(ir.to_proto(model)).graph.node]
    assert "MatMulNBits" in ops and "DequantizeLinear" not in ops


@pytest.mark.parametrize("case", sorted(DECLINED))
def test_int4_declined_where_onnxruntime_would_not_fuse_it(case):
    *shape_and_body, why = DECLINED[case]
    model = _after_matmul(*shape_and_body)
    before = ir.to_proto(model).SerializeToString()
    assert not QuantizeInt4WeightsPass(_matmul_names(model))(model).modified
    assert ir.to_proto(model).SerializeToString() == before  # the MatMul keeps its float weight
    note = next(n for n in notes(model) if n.startswith("int4 weights:"))
    assert why in note and "slower than float" in note


@pytest.mark.parametrize("case", sorted(DECLINED))
def test_each_decline_rule_matches_what_onnxruntime_does(case, monkeypatch):
    """Forced anyway, every declined case leaves the int4 weight dequantized on every run."""
    from qcompile.passes import quantize_int4_weights as module

    model = _after_matmul(*DECLINED[case][:2])
    monkeypatch.setattr(module, "matmulnbits_blocker", lambda node: None)
    assert QuantizeInt4WeightsPass(_matmul_names(model))(model).modified
    ops = [n.op_type for n in optimized_graph(ir.to_proto(model)).graph.node]
    assert "DequantizeLinear" in ops and "MatMulNBits" not in ops


def test_k_below_block_size_still_fuses():
    """K = 16 < block 32 (one short block per column): not a reason to decline."""
    model, weight = _model(k=16)
    assert QuantizeInt4WeightsPass(_matmul_names(model))(model).modified
    assert [n.op_type for n in optimized_graph(ir.to_proto(model)).graph.node] == ["LayerNormalization", "MatMulNBits"]
