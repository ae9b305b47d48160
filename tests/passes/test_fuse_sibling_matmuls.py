"""FuseSiblingMatMulsPass: bit-identical numbers, fewer onnxruntime kernels, the off switch, declines."""

import numpy as np
import onnx
import pytest

import qcompile
from qcompile.graph.notes import notes
from qcompile.options import CompileOptions, SchemeOptions, SmoothQuantOptions, VerificationOptions
from qcompile.passes import FuseSiblingMatMulsPass
from qcompile.verify.fusion import check_fusion, optimized_graph
from tests.helpers import count_ops, parse_model, run, sqnr_db, to_proto

rng = np.random.default_rng(0)

# Self-attention as exported from PyTorch: LayerNorm → query/key/value projections (bias Adds) →
# Reshape into 2 heads → Transpose, and the two activation MatMuls. Each projection's output is
# quantized (static, one scale) after its Reshape → Transpose, as the attention MatMuls' int8 input.
ATTENTION = """<ir_version: 8, opset_import: ["" : 17]>
g (float[1,6,16] x) => (float[1,6,16] y) {
  n = LayerNormalization <axis=-1> (x, gamma, beta)
  qm = MatMul(n, wq)
  qb = Add(qm, bq)
  qr = Reshape(qb, heads)
  q = Transpose <perm=[0,2,1,3]> (qr)
  km = MatMul(n, wk)
  kb = Add(km, bk)
  kr = Reshape(kb, heads)
  k = Transpose <perm=[0,2,3,1]> (kr)
  vm = MatMul(n, wv)
  vb = Add(vm, bv)
  vr = Reshape(vb, heads)
  v = Transpose <perm=[0,2,1,3]> (vr)
  s = MatMul(q, k)
  p = Softmax <axis=-1> (s)
  o = MatMul(p, v)
  ot = Transpose <perm=[0,2,1,3]> (o)
  y = Reshape(ot, merged)
}"""

# Two projections of different widths read by float ops and a graph output: the float Split form.
UNEQUAL = """<ir_version: 8, opset_import: ["" : 17]>
g (float[2,5,16] x) => (float[2,5,8] a, float[2,5,4] b, float[2,5,16] r) {
  n = LayerNormalization <axis=-1> (x, gamma, beta)
  am = MatMul(n, wa)
  a = Add(am, ba)
  bm = MatMul(n, wb)
  b = Relu(bm)
  r = Add(n, x)
}"""


def _initializers(text, gen):
    arrays = dict(
        gamma=gen.uniform(0.5, 2.0, size=16), beta=gen.normal(size=16),
        wq=gen.normal(size=(16, 16)), wk=gen.normal(size=(16, 16)), wv=gen.normal(size=(16, 16)),
        bq=gen.normal(size=16), bk=gen.normal(size=16), bv=gen.normal(size=16),
        wa=gen.normal(size=(16, 8)), ba=gen.normal(size=8), wb=gen.normal(size=(16, 4)),
        wb8=gen.normal(size=(16, 8)), wc8=gen.normal(size=(16, 8)),
    )
    out = {k: a.astype(np.float32) for k, a in arrays.items() if k in text}
    out.update(heads=np.array([1, 6, 2, 8], np.int64), merged=np.array([1, 6, 16], np.int64))
    return {k: a for k, a in out.items() if k in text}


def _feeds(shape, n=8, gen=rng):
    return [{"x": gen.normal(size=shape).astype(np.float32)} for _ in range(n)]


def _compile(text, shape, fuse, seed):
    """Compiled with sibling fusion on or off; the same seed gives the same weights and calibration data."""
    gen = np.random.default_rng(seed)
    inits = _initializers(text, gen)
    options = CompileOptions(scheme=SchemeOptions(fuse_sibling_matmuls=fuse), verification=VerificationOptions(enabled=False),
                             smooth_quant=SmoothQuantOptions(enabled=False), show_progress=False)
    return qcompile.compile_model(to_proto(parse_model(text, inits)), _feeds(shape, gen=gen), options), inits


def _run_optimized(model, feed):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(to_proto(model).SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feed)


@pytest.fixture(scope="module")
def attention():
    fused, inits = _compile(ATTENTION, (1, 6, 16), True, seed=1)
    unfused, _ = _compile(ATTENTION, (1, 6, 16), False, seed=1)
    return fused, unfused, inits


def test_attention_projections_become_one_product_with_the_same_numbers(attention):
    fused, unfused, inits = attention
    onnx.checker.check_model(fused.model, full_check=True)
    ops, before = count_ops(fused.model), count_ops(unfused.model)
    assert before["MatMulInteger"] == 3 and before["Split"] == 0 and before["QuantizeLinear"] == 4
    # One product, one QuantizeLinear for the three projections (plus softmax's), one Split.
    assert ops["MatMulInteger"] == 1 and ops["Split"] == 1 and ops["QuantizeLinear"] == 2
    assert ops["DynamicQuantizeLinear"] == 1
    for feed in _feeds((1, 6, 16), 4):
        # Same int32 sums, same scales, same uint8 values: bit-identical, unfused graph and fused kernels.
        np.testing.assert_array_equal(run(fused.model, feed)[0], run(unfused.model, feed)[0])
        np.testing.assert_array_equal(_run_optimized(fused.model, feed)[0], _run_optimized(unfused.model, feed)[0])
        # Still an int8 model of the float one (the tiny random attention is hard: ~18 dB).
        assert sqnr_db(run(parse_model(ATTENTION, inits), feed)[0], run(fused.model, feed)[0]) > 12
    assert any("3 MatMuls sharing a dynamically quantized input run as 1" in n and "1 of the 1 quantize" in n
               for p in fused.report.passes if p.name == "fuse_sibling_matmuls" for n in p.notes)


def test_onnxruntime_runs_fewer_kernels(attention):
    fused, unfused, _ = attention
    ops, before = count_ops(optimized_graph(fused.model)), count_ops(optimized_graph(unfused.model))
    # Before: one DynamicQuantizeLinear, 3 + 2 MatMulIntegerToFloat (projections, attention), 3 QuantizeLinear.
    assert before["DynamicQuantizeLinear"] == 1 and before["MatMulIntegerToFloat"] == 5
    # After: the quantization joins the single product (DynamicQuantizeMatMul), one QuantizeLinear.
    assert ops["DynamicQuantizeLinear"] == 0 and ops["DynamicQuantizeMatMul"] == 1 and ops["MatMulIntegerToFloat"] == 2
    assert ops["QuantizeLinear"] == before["QuantizeLinear"] - 2
    assert sum(ops.values()) < sum(before.values())
    report = check_fusion(fused.model)
    assert report.fused and report.kernels == {"DynamicQuantizeMatMul": 1, "MatMulIntegerToFloat": 2}


def test_option_off_gives_the_old_graph(attention):
    fused, unfused, _ = attention
    ran = {r.name for r in unfused.report.passes}
    assert "fuse_sibling_matmuls" not in ran and "fuse_sibling_matmuls" in {r.name for r in fused.report.passes}
    # The off graph is quantize_dynamic_matmul's: one MatMulInteger → Cast → Mul → Add per projection.
    ops = count_ops(unfused.model)
    assert ops["MatMulInteger"] == 3 and ops["Cast"] == 3 and ops["Split"] == 0


def test_unequal_widths_split_the_float_product_and_keep_output_names():
    fused, _ = _compile(UNEQUAL, (2, 5, 16), True, seed=2)
    unfused, _ = _compile(UNEQUAL, (2, 5, 16), False, seed=2)
    ops = count_ops(fused.model)
    assert ops["MatMulInteger"] == 1 and ops["Split"] == 1 and ops["QuantizeLinear"] == 0
    weight = next(v for v in fused.model.graph.initializer if v.name.endswith("fused_weight"))
    assert list(weight.dims) == [16, 12]
    assert [o.name for o in fused.model.graph.output] == ["a", "b", "r"]
    for feed in _feeds((2, 5, 16), 3):
        for got, want in zip(run(fused.model, feed), run(unfused.model, feed)):
            np.testing.assert_array_equal(got, want)
        for got, want in zip(_run_optimized(fused.model, feed), _run_optimized(unfused.model, feed)):
            np.testing.assert_array_equal(got, want)
    optimized = count_ops(optimized_graph(fused.model))
    assert optimized["DynamicQuantizeMatMul"] == 1 and optimized["MatMulIntegerToFloat"] == 0


# quantize_dynamic_matmul's form written out: four siblings on one DynamicQuantizeLinear. c's weight
# is a graph input (not a constant), d's weight zero point is 3 where the others have none.
DYNAMIC_FORM = """<ir_version: 8, opset_import: ["" : 17]>
g (float[2,5,16] x, int8[16,8] wc) => (float[2,5,8] a, float[2,5,8] b, float[2,5,8] c, float[2,5,8] d) {
  xq, sx, zx = DynamicQuantizeLinear(x)
  ia = MatMulInteger(xq, wa, zx)
  fa = Cast <to=1> (ia)
  sa = Mul(sx, swa)
  ma = Mul(fa, sa)
  a = Add(ma, ba)
  ib = MatMulInteger(xq, wb, zx)
  fb = Cast <to=1> (ib)
  sb = Mul(sx, swb)
  b = Mul(fb, sb)
  ic = MatMulInteger(xq, wc, zx)
  fc = Cast <to=1> (ic)
  sc = Mul(sx, swa)
  c = Mul(fc, sc)
  id = MatMulInteger(xq, wd, zx, zd)
  fd = Cast <to=1> (id)
  sd = Mul(sx, swb)
  d = Mul(fd, sd)
}"""


def _dynamic_form():
    int8 = lambda: rng.integers(-127, 128, size=(16, 8)).astype(np.int8)  # noqa: E731
    return parse_model(DYNAMIC_FORM, dict(
        wa=int8(), wb=int8(), wd=int8(), zd=np.array(3, np.int8),
        swa=rng.uniform(0.01, 0.02, size=8).astype(np.float32), swb=np.array(0.015, np.float32),
        ba=rng.normal(size=8).astype(np.float32),
    ))


def test_declines_a_non_constant_weight_and_a_different_zero_point():
    model = _dynamic_form()
    feed = {"x": rng.normal(size=(2, 5, 16)).astype(np.float32), "wc": rng.integers(-127, 128, size=(16, 8)).astype(np.int8)}
    want = run(model, feed)
    result = FuseSiblingMatMulsPass()(model)
    assert result.modified
    ops = count_ops(model)
    # a and b fuse (per-column and per-tensor weight scales, a bias and none); c and d keep theirs.
    assert ops["MatMulInteger"] == 3 and ops["Split"] == 1
    text = " ".join(notes(model))
    assert "not a constant" in text and "zero point differs" in text
    onnx.checker.check_model(to_proto(model), full_check=True)
    for got, expected in zip(run(model, feed), want):
        np.testing.assert_array_equal(got, expected)


def test_a_lone_sibling_is_left_alone():
    text = UNEQUAL.replace("  bm = MatMul(n, wb)\n  b = Relu(bm)\n", "  b = Relu(n)\n").replace("float[2,5,4] b", "float[2,5,16] b")
    result, _ = _compile(text, (2, 5, 16), True, seed=3)
    ran = {r.name: r.modified for r in result.report.passes}
    assert ran["fuse_sibling_matmuls"] is False and count_ops(result.model)["Split"] == 0


# Two projections straight into an activation MatMul: a's QuantizeLinear reads it directly, b's
# after a Transpose (movement chains of different lengths); three siblings per-tensor weights.
SCORES = """<ir_version: 8, opset_import: ["" : 17]>
g (float[1,6,16] x) => (float[1,6,6] y, float[1,6,8] c) {
  n = LayerNormalization <axis=-1> (x, gamma, beta)
  a = MatMul(n, wa)
  bm = MatMul(n, wb8)
  b = Transpose <perm=[0,2,1]> (bm)
  y = MatMul(a, b)
  c = MatMul(n, wc8)
}"""


def test_quantize_before_split_with_chains_of_different_lengths():
    fused, _ = _compile(SCORES, (1, 6, 16), True, seed=4)
    unfused, _ = _compile(SCORES, (1, 6, 16), False, seed=4)
    ops, before = count_ops(fused.model), count_ops(unfused.model)
    # c is a float graph output: not every sibling feeds a QuantizeLinear, so the product is split
    # in float and a and b keep their own QuantizeLinear.
    assert before["MatMulInteger"] == 3 and ops["MatMulInteger"] == 1 and ops["Split"] == 1
    assert ops["QuantizeLinear"] == before["QuantizeLinear"]
    for feed in _feeds((1, 6, 16), 3):
        for got, want in zip(run(fused.model, feed), run(unfused.model, feed)):
            np.testing.assert_array_equal(got, want)
    # Without c: both qualify and quantize once before the Split.
    text = SCORES.replace(", float[1,6,8] c", "").replace("  c = MatMul(n, wc8)\n", "")
    fused, _ = _compile(text, (1, 6, 16), True, seed=5)
    unfused, _ = _compile(text, (1, 6, 16), False, seed=5)
    ops, before = count_ops(fused.model), count_ops(unfused.model)
    assert ops["MatMulInteger"] == 1 and ops["Split"] == 1 and ops["QuantizeLinear"] == before["QuantizeLinear"] - 1
    for feed in _feeds((1, 6, 16), 3):
        np.testing.assert_array_equal(run(fused.model, feed)[0], run(unfused.model, feed)[0])
        np.testing.assert_array_equal(_run_optimized(fused.model, feed)[0], _run_optimized(unfused.model, feed)[0])
    assert check_fusion(fused.model).fused


def test_float_tensor_names_never_hold_integers(attention):
    # The Reshape/Transpose that now run on uint8 get new names: a name of the float model still
    # means that float tensor (the precision search's keep-one-float edit reads it as float).
    fused, _, inits = attention
    float_names = {o for n in parse_model(ATTENTION, inits).graph for o in (v.name for v in n.outputs)}
    movement = [n for n in fused.model.graph.node if n.op_type in ("Reshape", "Transpose")]
    integer = [o for n in movement for o in n.output if any(
        d.op_type == "DequantizeLinear" and d.input[0] == o for d in fused.model.graph.node)]
    assert integer  # the head reshapes/transposes run on uint8 ...
    assert not set(integer) & float_names  # ... under names the float model does not have
