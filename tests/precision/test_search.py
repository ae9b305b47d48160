"""The budgeted search on a tiny model: meets a budget with the fewest float layers, declines an
impossible one honestly; recipes replay byte for byte and stale ones are refused."""

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import qcompile
from qcompile.cli import main
from qcompile.errors import UsageError
from qcompile.options import CompileOptions, PrecisionOptions, SchemeOptions, SmoothQuantOptions
from qcompile.verify.sessions import make_session
from tests.helpers import to_proto
from tests.precision.models import chain, feeds


# The chain as the static int8 path compiles it: SmoothQuant would move its outlier channel into
# the weights (these tests need a layer int8 hurts), and with run-time quantization an int8 layer
# after a float one reads a dynamically quantized input, so "more float" need not mean "closer".
NO_SMOOTHING = SmoothQuantOptions(enabled=False)
STATIC = SchemeOptions(dynamic_matmul=False)


def compile_with(model, data, **precision):
    options = CompileOptions(show_progress=False, smooth_quant=NO_SMOOTHING, scheme=STATIC, precision=PrecisionOptions(**precision))
    return qcompile.compile_model(model, data, options)


def sqnr(model_a, model_b, data):
    a, b = make_session(model_a), make_session(model_b)
    ref = np.concatenate([a.run(None, f)[0] for f in data])
    out = np.concatenate([b.run(None, f)[0] for f in data])
    return 10 * np.log10(np.sum(ref**2) / np.sum((ref - out) ** 2))


def test_search_meets_a_budget_by_promoting_the_outlier_layer():
    model = to_proto(chain(outlier=400.0))
    plain = qcompile.compile_model(model, feeds(), CompileOptions(show_progress=False, smooth_quant=NO_SMOOTHING, scheme=STATIC))
    held_out = feeds(4, seed=9)
    int8_sqnr = sqnr(model, plain.model, held_out)
    budget = f"sqnr>={int8_sqnr + 10:.1f}"
    result = compile_with(model, feeds(), budget=budget)
    precision = result.report.precision
    assert precision["met"] and result.failure is None
    assert [p["name"] for p in precision["promoted"]] == ["mm2"]
    assert precision["promoted"][0]["reason"].startswith("kept float by the precision search: +")
    reasons = {n.name: n.reason for n in result.report.quantization.float_nodes}
    assert reasons["mm2"].startswith("kept float by the precision search")
    # Met on data the search never saw, measured with onnxruntime.
    assert sqnr(model, result.model, held_out) >= int8_sqnr + 10
    assert "Pareto front" in result.report.render_text()


def test_search_declines_an_impossible_budget_with_the_best_point():
    # mm3 pinned to int8 by the user: no assignment the search may make reaches 200 dB.
    result = compile_with(to_proto(chain(outlier=400.0)), feeds(), budget="sqnr>=200", precision=("mm3=int8",))
    precision = result.report.precision
    assert not precision["met"]
    assert "cannot be met" in result.failure and "best reachable" in result.failure and "sqnr>=200" in result.failure
    # The best point: both searchable layers float, mm3 int8 as pinned.
    assert precision["chosen"]["float_layers"] == 2 and 20 < precision["chosen"]["value"] < 200
    assert precision["layers"] == 2


def test_callable_budget_from_the_api():
    calls = []

    def agree(reference, test):
        calls.append(len(reference))
        drop = np.mean([np.mean(np.argmax(r[0], 1) != np.argmax(t[0], 1)) for r, t in zip(reference, test)])
        return float(drop), drop <= 0.0

    model = to_proto(chain(outlier=400.0))
    result = qcompile.compile_model(model, feeds(), CompileOptions(show_progress=False), budget=agree)
    assert calls and result.report.precision["budget"] == "agree"
    assert result.report.precision["met"]


def test_recipe_replays_byte_identical_and_refuses_stale(tmp_path):
    model = to_proto(chain(outlier=400.0))
    searched = compile_with(model, feeds(), budget="sqnr>=25")
    out = searched.save(tmp_path / "m.onnx")
    recipe = tmp_path / "m.onnx.recipe.json"
    assert recipe.exists() and (tmp_path / "m.onnx.pareto.html").read_text().count("<circle") >= 2
    replayed = compile_with(model, feeds(), recipe=recipe)
    assert replayed.model.SerializeToString() == onnx.load(out).SerializeToString()
    assert replayed.report.passes[[p.name for p in replayed.report.passes].index("calibrate")].notes[0].startswith(
        "calibration: ranges from recipe"
    )
    with pytest.raises(UsageError, match="other calibration data"):
        compile_with(model, feeds(seed=5), recipe=recipe)
    with pytest.raises(UsageError, match="another model"):
        compile_with(to_proto(chain(outlier=400.0, seed=3)), feeds(), recipe=recipe)
    with pytest.raises(UsageError, match="drop --keep-float"):
        compile_with(model, feeds(), recipe=recipe, precision=("mm1=fp32",))


def test_cli_budget_then_recipe(tmp_path):
    model = tmp_path / "model.onnx"
    onnx.save(to_proto(chain(outlier=400.0)), model)
    calib = tmp_path / "calib"
    calib.mkdir()
    for i, feed in enumerate(feeds(10)):
        np.savez(calib / f"s{i:02d}.npz", **feed)
    first, second = tmp_path / "a.onnx", tmp_path / "b.onnx"
    run = CliRunner().invoke(main, ["compile", str(model), "-o", str(first), "--calib", str(calib), "--budget", "sqnr>=25",
                                 "--no-smooth-quant", "--no-dynamic-matmul"])
    assert run.exit_code == 0, run.output
    assert "Pareto front" in run.output and "kept float by the precision search" in run.output
    recipe = f"{first}.recipe.json"
    # Display flags (--quiet) do not change the bytes.
    run = CliRunner().invoke(main, ["compile", str(model), "-o", str(second), "--calib", str(calib), "--recipe", recipe, "--quiet",
                                 "--no-smooth-quant", "--no-dynamic-matmul"])
    assert run.exit_code == 0, run.output
    assert first.read_bytes() == second.read_bytes()
    stale = tmp_path / "other.onnx"
    onnx.save(to_proto(chain(seed=4)), stale)
    run = CliRunner().invoke(main, ["compile", str(stale), "-o", str(tmp_path / "c.onnx"), "--calib", str(calib), "--recipe", recipe,
                                 "--no-smooth-quant", "--no-dynamic-matmul"])
    assert run.exit_code == 2 and run.output.count("\n") == 1 and "another model" in run.output


def test_sensitivity_is_cached_beside_the_calibration_cache(tmp_path):
    model = to_proto(chain(outlier=400.0))
    cache = tmp_path / "calib.json"
    options = CompileOptions(
        show_progress=False,
        calibration=qcompile.CalibrationOptions(cache=cache),
        precision=PrecisionOptions(budget="sqnr>=25"),
    )
    first = qcompile.compile_model(model, feeds(), options)
    sensitivity = tmp_path / "calib.json.sensitivity.json"
    assert sensitivity.exists() and not first.report.precision["sensitivity_cached"]
    second = qcompile.compile_model(model, feeds(), options)
    assert second.report.precision["sensitivity_cached"] and second.report.calibration["cache_hit"]
    assert second.model.SerializeToString() == first.model.SerializeToString()
    assert second.report.precision["sensitivity"] == first.report.precision["sensitivity"]


def test_recipe_replay_with_a_warm_cache_reads_no_data_for_smoothquant(tmp_path, monkeypatch):
    import qcompile.pipeline

    model = to_proto(chain(outlier=400.0))
    cache = tmp_path / "calib.json"

    def options(**precision):
        return CompileOptions(
            show_progress=False, calibration=qcompile.CalibrationOptions(cache=cache), precision=PrecisionOptions(**precision),
            verification=qcompile.VerificationOptions(enabled=False),  # its passes over the data are not SmoothQuant's
        )

    searched = qcompile.compile_model(model, feeds(), options(budget="sqnr>=20"))
    smoothing = next(p for p in searched.report.passes if p.name == "smooth_quant")
    assert smoothing.modified  # SmoothQuant moved the outlier channel: its decisions are worth caching
    out = searched.save(tmp_path / "m.onnx")

    def no_statistics(*args, **kwargs):
        raise AssertionError("SmoothQuant's statistics pass ran")

    passes = []

    class Counting(list):
        def __iter__(self):
            passes.append(1)
            return super().__iter__()

    monkeypatch.setattr(qcompile.pipeline, "collect_channel_stats", no_statistics)
    replayed = qcompile.compile_model(model, Counting(feeds()), options(recipe=tmp_path / "m.onnx.recipe.json"))
    assert replayed.model.SerializeToString() == onnx.load(out).SerializeToString()
    assert len(passes) == 1  # the data fingerprint, shared by SmoothQuant's key and the recipe's check
