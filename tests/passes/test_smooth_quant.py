"""SmoothQuantPass: outlier channels moved into MatMul weights; exact in float, better in int8."""

import numpy as np
import onnx_ir.passes.common as common_passes
import pytest

import qcompile
from qcompile.calibration.channel_stats import ChannelStatsObserver, collect_channel_stats
from qcompile.errors import UsageError
from qcompile.graph.notes import notes
from qcompile.options import CalibrationOptions, SchemeOptions, SmoothQuantOptions
from qcompile.passes import AnnotatePass, SmoothQuantPass
from qcompile.quant.spec import DECISION_KEY
from tests.helpers import assert_numerically_close, count_ops, parse_model, run, sqnr_db, to_proto

# LayerNormalization → Q and K projections (a group sharing h) and a residual Add reading h.
LN_GROUP = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N,6,16] x) => (float[N,6,8] q, float[N,6,16] r) {
  h = LayerNormalization <axis=-1> (x, gamma, beta)
  q = MatMul(h, wq)
  k = MatMul(h, wk)
  r = Add(h, k)
}"""

# The same without the residual: only the group reads h, so 1/s folds into γ and β.
LN_ONLY_GROUP = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N,6,16] x) => (float[N,6,8] q, float[N,6,16] k) {
  h = LayerNormalization <axis=-1> (x, gamma, beta)
  q = MatMul(h, wq)
  k = MatMul(h, wk)
}"""


def _inits(seed=0):
    local = np.random.default_rng(seed)
    gamma = local.uniform(0.5, 1.5, size=16).astype(np.float32)
    gamma[[3, 11]] = [25.0, -18.0]  # outlier channels, as in transformer LayerNorm outputs
    return dict(
        gamma=gamma, beta=local.normal(scale=0.1, size=16).astype(np.float32),
        wq=local.normal(scale=0.2, size=(16, 8)).astype(np.float32),
        wk=local.normal(scale=0.2, size=(16, 16)).astype(np.float32),
    )


def _feeds(n=16, seed=1, batch=2):
    local = np.random.default_rng(seed)
    return [{"x": local.normal(size=(batch, 6, 16)).astype(np.float32)} for _ in range(n)]


def _options(**smooth):
    return qcompile.CompileOptions(
        smooth_quant=SmoothQuantOptions(**smooth), verification=qcompile.VerificationOptions(enabled=False), show_progress=False
    )


def _smooth_float(text, inits, feeds, options=SmoothQuantOptions()):
    """Annotate, then run the pass alone: the float graph it leaves (no Q/DQ yet)."""
    model = parse_model(text, inits)
    common_passes.ShapeInferencePass()(model)
    AnnotatePass(SchemeOptions())(model)

    def statistics(names):
        return collect_channel_stats(model, names, feeds, rows=options.rows)

    result = SmoothQuantPass(options, SchemeOptions(), CalibrationOptions(), statistics)(model)
    return result, model


def test_smoothing_reduces_the_error_of_an_outlier_channel():
    inits, feeds = _inits(), _feeds()
    x = _feeds(1, seed=9, batch=8)[0]
    reference = run(parse_model(LN_GROUP, inits), x)
    smoothed = qcompile.compile_model(to_proto(parse_model(LN_GROUP, inits)), feeds, _options()).model
    plain = qcompile.compile_model(to_proto(parse_model(LN_GROUP, inits)), feeds, _options(enabled=False)).model
    got_smoothed, got_plain = run(smoothed, x), run(plain, x)
    for ref, a, b in zip(reference, got_smoothed, got_plain):
        assert sqnr_db(ref, a) > sqnr_db(ref, b) + 6
    # The 1/s went into one float Mul read by both MatMuls; the residual Add still reads h.
    smoothing_muls = lambda m: [n for n in m.graph.node if n.op_type == "Mul" and "smooth" in n.name]  # noqa: E731
    assert len(smoothing_muls(smoothed)) == 1 and not smoothing_muls(plain)
    mul = next(n for n in smoothed.graph.node if n.op_type == "Mul")
    assert mul.input[0] == "h" and not any(n.op_type == "QuantizeLinear" and n.input[0] == "h" for n in smoothed.graph.node)


def test_turning_it_off_restores_the_output_without_the_pass():
    inits, feeds = _inits(), _feeds()
    off = qcompile.compile_model(to_proto(parse_model(LN_GROUP, inits)), feeds, _options(enabled=False))
    # With a gain nobody reaches, the pass runs, declines every group and changes nothing.
    declined = qcompile.compile_model(to_proto(parse_model(LN_GROUP, inits)), feeds, _options(min_gain=0.999))
    assert off.model.graph.SerializeToString() == declined.model.graph.SerializeToString()
    assert "smooth_quant" not in [p.name for p in off.report.passes]
    record = next(p for p in declined.report.passes if p.name == "smooth_quant")
    assert not record.modified and any("no α lowers" in n for n in record.notes)


def test_the_pass_is_exact_in_float_with_a_mul_pinned_float():
    inits, feeds = _inits(), _feeds()
    result, model = _smooth_float(LN_GROUP, inits, feeds)
    assert result.modified
    mul = next(n for n in model.graph if n.op_type == "Mul")
    AnnotatePass(SchemeOptions())(model)  # the pipeline's second annotation
    assert not mul.meta[DECISION_KEY].quantized and "SmoothQuant" in mul.meta[DECISION_KEY].reason
    assert not np.array_equal(model.graph.initializers["wq"].const_value.numpy(), inits["wq"])
    x = _feeds(1, seed=9, batch=8)[0]
    assert_numerically_close(parse_model(LN_GROUP, inits), model, x, rtol=1e-4, atol_rel=1e-5)


def test_layernorm_fold_is_exact_in_float():
    inits, feeds = _inits(), _feeds()
    result, model = _smooth_float(LN_ONLY_GROUP, inits, feeds)
    assert result.modified and count_ops(model)["Mul"] == 0
    gamma = model.graph.initializers["gamma"].const_value.numpy()
    assert abs(gamma[3]) < 25.0 / 2  # the outlier channel was divided down
    assert any("folded into" in n for n in notes(model))
    x = _feeds(1, seed=9, batch=8)[0]
    assert_numerically_close(parse_model(LN_ONLY_GROUP, inits), model, x, rtol=1e-4, atol_rel=1e-5)


def test_a_weight_that_is_a_graph_output_is_left_alone():
    text = """<ir_version: 8, opset_import: ["" : 17]>
    g (float[N,6,16] x) => (float[N,6,8] q, float[16,8] wq) {
      h = LayerNormalization <axis=-1> (x, gamma, beta)
      q = MatMul(h, wq)
    }"""
    inits = {k: v for k, v in _inits().items() if k != "wk"}
    result, model = _smooth_float(text, inits, _feeds())
    assert not result.modified
    np.testing.assert_array_equal(model.graph.initializers["wq"].const_value.numpy(), inits["wq"])
    assert any("graph output" in n for n in notes(model))


def test_a_tensor_made_by_an_int8_op_is_declined():
    text = """<ir_version: 8, opset_import: ["" : 17]>
    g (float[N,3,8,8] x) => (float[N,10] y) {
      c = Conv (x, w)
      p = GlobalAveragePool(c)
      f = Flatten(p)
      y = Gemm <transB=1> (f, fw)
    }"""
    local = np.random.default_rng(2)
    inits = dict(w=local.normal(size=(4, 3, 3, 3)).astype(np.float32), fw=local.normal(size=(10, 4)).astype(np.float32))

    def no_data(names):
        raise AssertionError("no statistics are needed when every group is declined")

    model = parse_model(text, inits)
    common_passes.ShapeInferencePass()(model)
    AnnotatePass(SchemeOptions())(model)
    result = SmoothQuantPass(SmoothQuantOptions(), SchemeOptions(), CalibrationOptions(), no_data)(model)
    assert not result.modified
    assert any("made by the int8 op" in n for n in notes(model))


def test_channel_stats_are_exact_maxima_and_a_bounded_uniform_sample():
    local = np.random.default_rng(4)
    batches = [local.normal(size=(3, 10, 5)).astype(np.float32) for _ in range(20)]
    observer = ChannelStatsObserver(rows=64, seed=0)
    for batch in batches:
        observer.update(batch)
    stats = observer.result()
    everything = np.concatenate([b.reshape(-1, 5) for b in batches])
    np.testing.assert_array_equal(stats.absmax, np.abs(everything).max(axis=0))
    assert stats.rows.shape == (64, 5) and stats.seen == 600
    # Every sampled row is a real row, and rows from late batches made it in (not just the first 64).
    index = {row.tobytes(): i for i, row in enumerate(everything)}
    positions = [index[row.tobytes()] for row in stats.rows]
    assert len(set(positions)) == 64 and max(positions) > 300
    small = ChannelStatsObserver(rows=64)
    small.update(batches[0])
    assert small.result().rows.shape == (30, 5)


def test_calibration_cache_key_covers_the_smoothing(tmp_path):
    inits, feeds = _inits(), _feeds()
    cache = tmp_path / "ranges.json"

    def options(**smooth):
        return qcompile.CompileOptions(
            smooth_quant=SmoothQuantOptions(**smooth), calibration=CalibrationOptions(cache=cache),
            verification=qcompile.VerificationOptions(enabled=False), show_progress=False,
        )

    first = qcompile.compile_model(to_proto(parse_model(LN_GROUP, inits)), feeds, options())
    again = qcompile.compile_model(to_proto(parse_model(LN_GROUP, inits)), feeds, options())
    assert again.report.calibration["cache_hit"] and first.model.SerializeToString() == again.model.SerializeToString()
    # Without smoothing the calibrated model differs: the cache is refused, not silently reused.
    with pytest.raises(UsageError, match="another model"):
        qcompile.compile_model(to_proto(parse_model(LN_GROUP, inits)), feeds, options(enabled=False))


@pytest.mark.parametrize("bad", [dict(alphas=()), dict(alphas=(1.5,)), dict(min_gain=1.0), dict(rows=0)])
def test_options_are_validated(bad):
    with pytest.raises(UsageError):
        SmoothQuantOptions(**bad)


def test_readers_outside_the_group_keep_the_unscaled_tensor():
    inits, feeds = _inits(), _feeds()
    result, model = _smooth_float(LN_GROUP, inits, feeds)
    h = next(n for n in model.graph if n.op_type == "LayerNormalization").outputs[0]
    assert result.modified and sorted(u.node.op_type for u in h.uses()) == ["Add", "Mul"]
