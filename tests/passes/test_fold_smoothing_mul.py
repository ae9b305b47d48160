"""FoldSmoothingMulPass: exact in float (numbers against onnxruntime), the Mul gone, declines."""

import re

import numpy as np
import onnx_ir.passes.common as common_passes
import pytest

import qcompile
from qcompile.graph.notes import notes
from qcompile.options import SchemeOptions, SmoothQuantOptions
from qcompile.passes import AnnotatePass, FoldSmoothingMulPass
from qcompile.passes.smooth_quant import SMOOTHING_MUL
from qcompile.quant.spec import DECISION_KEY, FLOAT_REASON_KEY
from tests.helpers import assert_numerically_close, count_ops, parse_model, run, sqnr_db, to_proto

rng = np.random.default_rng(0)

# The attention context of 2 heads × 4 dims: V projection → split heads → P·V → merge heads, then
# the SmoothQuant Mul and the output projection.
CONTEXT = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N,6,8] x, float[N,2,6,6] p) => (float[N,6,8] y) {
  m = MatMul(x, wv)
  v = Add(m, bv)
  {split}
  vt = Transpose <perm=[0,2,1,3]> (vh)
  c = MatMul(p, vt)
  ct = Transpose <perm=[0,2,1,3]> (c)
  {merge}
  xs = Mul(cm, factor)
  y = MatMul(xs, wo)
}"""

CONSTANT_SHAPES = ("vh = Reshape(v, split_shape)", "cm = Reshape(ct, merge_shape)")
# As exported from PyTorch: batch and sequence read at run time, heads as -1.
RUNTIME_SHAPES = (
    """sh = Shape(x)
  b = Gather <axis=0> (sh, i0)
  s = Gather <axis=0> (sh, i1)
  bu = Unsqueeze(b, ax0)
  su = Unsqueeze(s, ax0)
  split_shape = Concat <axis=0> (bu, su, minus_one, head_dim)
  vh = Reshape(v, split_shape)""",
    """merge_shape = Concat <axis=0> (bu, su, minus_one)
  cm = Reshape(ct, merge_shape)""",
)

WEIGHTS = dict(
    wv=rng.normal(size=(8, 8)).astype(np.float32), bv=rng.normal(size=8).astype(np.float32),
    wo=rng.normal(size=(8, 8)).astype(np.float32), factor=rng.uniform(0.2, 5.0, size=8).astype(np.float32),
    split_shape=np.array([1, 6, 2, 4]), merge_shape=np.array([1, 6, 8]),
    i0=np.array(0), i1=np.array(1), ax0=np.array([0]), minus_one=np.array([-1]), head_dim=np.array([4]),
)


def _model(shapes=CONSTANT_SHAPES, text=CONTEXT, **overrides):
    text = text.replace("{split}", shapes[0]).replace("{merge}", shapes[1])
    # Only the constants the graph reads (a computed shape is a node output, not an initializer).
    outputs = set(re.findall(r"^\s*(\w+) =", text, re.M))
    inits = {k: v for k, v in {**WEIGHTS, **overrides}.items() if re.search(rf"\b{k}\b", text) and k not in outputs}
    model = parse_model(text, inits)
    common_passes.ShapeInferencePass()(model)
    mul = next(n for n in model.graph if n.op_type == "Mul")
    mul.metadata_props[FLOAT_REASON_KEY] = SMOOTHING_MUL
    return model


def _feed(batch=1):
    probs = rng.uniform(size=(batch, 2, 6, 6)).astype(np.float32)
    return {"x": rng.normal(size=(batch, 6, 8)).astype(np.float32), "p": probs / probs.sum(-1, keepdims=True)}


@pytest.mark.parametrize("shapes", [CONSTANT_SHAPES, RUNTIME_SHAPES], ids=["constant", "runtime"])
def test_context_scale_moves_into_the_value_projection(shapes):
    before, after = _model(shapes), _model(shapes)
    assert FoldSmoothingMulPass()(after).modified
    common_passes.RemoveUnusedNodesPass()(after)
    assert count_ops(after)["Mul"] == 0
    feed = _feed(2 if shapes is RUNTIME_SHAPES else 1)
    assert_numerically_close(before, after, feed, rtol=1e-5, atol_rel=1e-5)
    # Head h, dimension d of the context is channel 4h + d of V: the columns took the factor.
    wv = after.graph.initializers["wv"].const_value.numpy()
    np.testing.assert_allclose(wv, WEIGHTS["wv"] * WEIGHTS["factor"][None, :], rtol=1e-6)
    np.testing.assert_allclose(after.graph.initializers["bv"].const_value.numpy(), WEIGHTS["bv"] * WEIGHTS["factor"], rtol=1e-6)
    assert any("fold_smoothing_mul: 1 SmoothQuant Mul(s) folded" in n for n in notes(after))
    # Names keep their meaning: the merged context holds what the Mul output held; the scaled
    # values on the way are renamed (the float model's v, c are unscaled).
    produced = {n.op_type + "/" + n.outputs[0].name for n in after.graph}
    assert "Reshape/xs" in produced and "Add/v_smoothed" in produced and "MatMul/c_smoothed" in produced


def test_the_step_before_stays_float_so_the_projection_still_reads_a_float_op():
    model = _model()
    FoldSmoothingMulPass()(model)
    AnnotatePass(SchemeOptions())(model)
    merge = next(n for n in model.graph if n.op_type == "Reshape" and n.outputs[0].uses()[0].node.op_type == "MatMul")
    projection = next(n for n in model.graph if n.outputs[0].name == "y")
    assert not merge.meta[DECISION_KEY].quantized and projection.meta[DECISION_KEY].quantized


def test_a_reshape_that_does_not_regroup_the_channels_is_declined():
    # (1, 6, 8) → (1, 8, 6): the last axis mixes channels and tokens.
    text = CONTEXT.replace("vt = Transpose <perm=[0,2,1,3]> (vh)\n  c = MatMul(p, vt)\n  ct = Transpose <perm=[0,2,1,3]> (c)\n", "")
    text = text.replace("g (float[N,6,8] x, float[N,2,6,6] p)", "g (float[N,6,8] x)")
    model = _model(("vh = Reshape(v, split_shape)", "cm = Reshape(vh, merge_shape)"), text,
                   split_shape=np.array([1, 8, 6]), merge_shape=np.array([1, 6, 8]))
    FoldSmoothingMulPass()(model)
    assert count_ops(model)["Mul"] == 1
    assert any("does not provably regroup" in n for n in notes(model))


def test_a_matmul_summing_over_the_channels_is_declined():
    # P·Vᵀ: the contraction runs over V's head dimension.
    text = CONTEXT.replace("vt = Transpose <perm=[0,2,1,3]> (vh)", "vt = Transpose <perm=[0,2,3,1]> (vh)").replace(
        "g (float[N,6,8] x, float[N,2,6,6] p)", "g (float[N,6,8] x, float[N,2,6,4] p)")
    model = _model(CONSTANT_SHAPES, text)
    FoldSmoothingMulPass()(model)
    assert count_ops(model)["Mul"] == 1
    assert any("sums over a channel axis" in n for n in notes(model))


def test_a_second_reader_on_the_chain_is_declined():
    text = CONTEXT.replace("=> (float[N,6,8] y)", "=> (float[N,6,8] y, float[N,6,8] v)")
    model = _model(CONSTANT_SHAPES, text)
    FoldSmoothingMulPass()(model)
    assert count_ops(model)["Mul"] == 1
    assert any("read elsewhere" in n for n in notes(model))


def test_a_mul_not_made_by_smoothquant_is_left_alone():
    model = _model()
    mul = next(n for n in model.graph if n.op_type == "Mul")
    del mul.metadata_props[FLOAT_REASON_KEY]
    assert not FoldSmoothingMulPass()(model).modified
    assert not any("fold_smoothing_mul" in n for n in notes(model))


def _compile(fold_upstream):
    text = CONTEXT.replace("{split}", CONSTANT_SHAPES[0]).replace("{merge}", CONSTANT_SHAPES[1])
    text = text.replace("  xs = Mul(cm, factor)\n  y = MatMul(xs, wo)", "  y = MatMul(cm, wo)")
    local = np.random.default_rng(3)
    wv = local.normal(size=(8, 8)).astype(np.float32)
    wv[:, [2, 5]] *= 30.0  # outlier channels of the context, for SmoothQuant to move into wo
    inits = {k: v for k, v in WEIGHTS.items() if k in ("bv", "wo", "split_shape", "merge_shape")}
    model = parse_model(text, {**inits, "wv": wv})
    feeds = [_feed() for _ in range(16)]
    options = qcompile.CompileOptions(
        smooth_quant=SmoothQuantOptions(min_gain=0.0, fold_upstream=fold_upstream),
        verification=qcompile.VerificationOptions(enabled=False), show_progress=False,
    )
    result = qcompile.compile_model(to_proto(model), feeds, options)
    return model, result, feeds


def test_option_folds_the_context_mul_and_off_keeps_it():
    model, off, feeds = _compile(False)
    _, on, _ = _compile(True)
    ran_off = {r.name: r.modified for r in off.report.passes}
    ran_on = {r.name: r.modified for r in on.report.passes}
    assert ran_off["smooth_quant"] and "fold_smoothing_mul" not in ran_off
    assert ran_on["fold_smoothing_mul"]
    # The smoothing Mul is the only Mul: off keeps it, on folds it into wv and bv.
    assert count_ops(off.model)["Mul"] - count_ops(on.model)["Mul"] == 1
    reference, quantized = run(model, feeds[0])[0], run(on.model, feeds[0])[0]
    assert sqnr_db(reference, quantized) > 25


# GPT-2's c_attn: one packed projection for q, k and v, split on its last axis.
PACKED = CONTEXT.replace("  m = MatMul(x, wv)\n  v = Add(m, bv)\n", "  m = MatMul(x, wqkv)\n  qkv = Add(m, bqkv)\n"
                         "  q, k, v = Split <axis=-1> (qkv, sizes)\n").replace(
    "=> (float[N,6,8] y)", "=> (float[N,6,8] y, float[N,6,8] q, float[N,6,8] k)")
PACKED_WEIGHTS = dict(wqkv=rng.normal(size=(8, 24)).astype(np.float32), bqkv=rng.normal(size=24).astype(np.float32),
                      sizes=np.array([8, 8, 8]))


def test_a_packed_projection_scales_only_the_value_columns():
    before, after = _model(text=PACKED, **PACKED_WEIGHTS), _model(text=PACKED, **PACKED_WEIGHTS)
    assert FoldSmoothingMulPass()(after).modified
    common_passes.RemoveUnusedNodesPass()(after)
    assert count_ops(after)["Mul"] == 0
    assert_numerically_close(before, after, _feed(), rtol=1e-5, atol_rel=1e-5)
    factors = np.concatenate([np.ones(16, np.float32), WEIGHTS["factor"]])
    np.testing.assert_allclose(after.graph.initializers["wqkv"].const_value.numpy(), PACKED_WEIGHTS["wqkv"] * factors, rtol=1e-6)
    np.testing.assert_allclose(after.graph.initializers["bqkv"].const_value.numpy(), PACKED_WEIGHTS["bqkv"] * factors, rtol=1e-6)


def test_a_split_across_the_channels_of_a_piece_is_declined():
    # Pieces of 4, 4 and 16 columns: v (16) is not the 8 channels the context merges back.
    text = PACKED.replace("float[N,6,8] q, float[N,6,8] k", "float[N,6,4] q, float[N,6,4] k")
    model = _model(text=text, **{**PACKED_WEIGHTS, "sizes": np.array([4, 4, 16])})
    FoldSmoothingMulPass()(model)
    assert count_ops(model)["Mul"] == 1
