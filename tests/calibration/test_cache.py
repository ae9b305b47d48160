"""The calibration cache: a hit skips calibration and gives the same model bytes; another
model, data or settings is refused with a clear message; the file is checked JSON, never code."""

from __future__ import annotations

import json

import numpy as np
import pytest

import qcompile
import qcompile.pipeline
from qcompile.errors import UsageError
from qcompile.options import CalibrationOptions
from tests.helpers import to_proto
from tests.passes.test_annotate import conv_relu_pool_gemm

MODEL = to_proto(conv_relu_pool_gemm())


def feeds(seed: int = 0, n: int = 4) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(size=(2, 3, 8, 8)).astype(np.float32)} for _ in range(n)]


def options(cache, **calibration) -> qcompile.CompileOptions:
    return qcompile.CompileOptions(
        calibration=CalibrationOptions(cache=cache, **calibration),
        verification=qcompile.VerificationOptions(enabled=False),
        show_progress=False,
    )


def compile_with(cache, model=MODEL, data=None, **calibration):
    return qcompile.compile_model(model, data if data is not None else feeds(), options(cache, **calibration))


def pass_names(result) -> list[str]:
    return [p.name for p in result.report.passes]


def test_a_miss_writes_the_cache_and_a_hit_skips_calibration(tmp_path, monkeypatch):
    cache = tmp_path / "ranges.json"
    first = compile_with(cache)
    assert cache.exists() and not list(tmp_path.glob("*.tmp"))
    assert first.report.calibration["cache"] == str(cache) and first.report.calibration["cache_hit"] is False
    assert "insert_observers" in pass_names(first)

    def no_calibration(*args, **kwargs):
        raise AssertionError("calibration ran on a cache hit")

    monkeypatch.setattr(qcompile.pipeline, "calibrate", no_calibration)
    second = compile_with(cache)
    assert second.model.SerializeToString() == first.model.SerializeToString()
    assert second.report.calibration["cache_hit"] is True
    assert second.report.calibration["fingerprint"] == first.report.calibration["fingerprint"]
    assert (second.report.calibration["feeds"], second.report.calibration["samples"]) == (4, 8)
    calibrate = next(p for p in second.report.passes if p.name == "calibrate")
    assert calibrate.notes == [f"calibration: from cache {cache}"]
    assert "insert_observers" not in pass_names(second)
    assert f"calibration: from cache {cache}" in second.report.render_text()


def test_a_hit_gives_the_graph_of_a_compile_without_cache(tmp_path):
    cache = tmp_path / "ranges.json"
    compile_with(cache, method="mse")
    hit = compile_with(cache, method="mse")
    plain = compile_with(None, method="mse")
    # Only the options recorded in the model's metadata (the cache path) differ.
    assert hit.model.graph.SerializeToString() == plain.model.graph.SerializeToString()
    content = json.loads(cache.read_text())
    assert content["format"] == "qcompile-calibration-cache/2" and content["key"]["settings"]["method"] == "mse"
    assert content["key"]["data"] == plain.report.calibration["fingerprint"]


@pytest.mark.parametrize(
    "change, what",
    [
        ({"data": feeds(seed=1)}, "data"),
        ({"data": feeds(n=3)}, "data"),
        ({"method": "percentile"}, "settings"),
        ({"model": to_proto(conv_relu_pool_gemm(seed=1))}, "model"),  # same graph, other weights
    ],
    ids=["other-values", "fewer-feeds", "other-method", "other-weights"],
)
def test_a_stale_cache_is_refused(tmp_path, change, what):
    cache = tmp_path / "ranges.json"
    compile_with(cache)
    before = cache.read_bytes()
    with pytest.raises(UsageError, match=rf"calibration cache .*ranges.json was made for another {what} \(fingerprint "
                       r"[0-9a-f]{12}…, this compile needs [0-9a-f]{12}…\); delete it or pass another path"):
        compile_with(cache, **change)
    assert cache.read_bytes() == before  # refused, not overwritten


def test_settings_the_method_does_not_read_do_not_invalidate(tmp_path):
    cache = tmp_path / "ranges.json"
    compile_with(cache, method="mse", percentile=99.0)
    assert compile_with(cache, method="mse", percentile=99.9).report.calibration["cache_hit"]
    with pytest.raises(UsageError, match="another settings"):
        compile_with(cache, method="mse", bins=1024)


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"\x00\x01 not json", "unreadable"),
        (b"[1, 2, 3]", "format marker"),
        (b'{"format": "something else"}', "format marker"),
    ],
)
def test_a_file_that_is_not_a_cache_is_refused(tmp_path, content, reason):
    cache = tmp_path / "ranges.json"
    cache.write_bytes(content)
    with pytest.raises(UsageError, match=f"is not a valid qcompile calibration cache .*{reason}.*delete it or pass another path"):
        compile_with(cache)


@pytest.mark.parametrize(
    "tamper, reason",
    [
        (lambda r: r.update(scale=-1.0), "scales must be finite and positive"),
        (lambda r: r.update(scale="__import__('os')"), "not a finite number"),
        (lambda r: r.update(zero_point=float("nan")), "not a finite number"),
        (lambda r: r["spec"].update(dtype="int8"), "does not match its quantization spec"),
    ],
)
def test_cache_entries_are_checked_as_data(tmp_path, tamper, reason):
    cache = tmp_path / "ranges.json"
    compile_with(cache)
    content = json.loads(cache.read_text())
    tamper(next(iter(content["ranges"].values())))
    cache.write_text(json.dumps(content))
    with pytest.raises(UsageError, match=reason):
        compile_with(cache)


def test_missing_cache_folder_fails_before_calibrating(tmp_path):
    with pytest.raises(UsageError, match="calibration cache folder does not exist"):
        compile_with(tmp_path / "nope" / "ranges.json")


# --- SmoothQuant's decisions ------------------------------------------------------------------------

from qcompile.calibration import cache as calibration_cache  # noqa: E402
from qcompile.options import SchemeOptions, SmoothQuantOptions  # noqa: E402
from tests.passes.test_smooth_quant import LN_GROUP, _feeds, _inits  # noqa: E402
from tests.helpers import parse_model  # noqa: E402

SMOOTHED = to_proto(parse_model(LN_GROUP, _inits()))


class CountingFeeds:
    """Feeds that count the passes made over them (each ``iter``), and can refuse to be read."""

    def __init__(self, feeds, readable=True):
        self.feeds, self.passes, self.readable = feeds, 0, readable

    def __iter__(self):
        self.passes += 1
        assert self.readable, "the data was read"
        return iter(self.feeds)

    def __len__(self):
        return len(self.feeds)


def compile_smoothed(cache, data=None, model=SMOOTHED, **smooth):
    options = qcompile.CompileOptions(
        calibration=CalibrationOptions(cache=cache), smooth_quant=SmoothQuantOptions(**smooth),
        verification=qcompile.VerificationOptions(enabled=False), show_progress=False,
    )
    return qcompile.compile_model(model, data if data is not None else _feeds(), options)


def smooth_notes(result) -> list[str]:
    return next(p for p in result.report.passes if p.name == "smooth_quant").notes


def no_statistics(*args, **kwargs):
    raise AssertionError("SmoothQuant's statistics pass ran")


def test_a_hit_skips_smoothquants_data_pass_and_gives_the_same_bytes(tmp_path, monkeypatch):
    cache = tmp_path / "ranges.json"
    cold_data = CountingFeeds(_feeds())
    cold = compile_smoothed(cache, cold_data)
    assert any("1/s in a new float Mul" in n for n in smooth_notes(cold))  # it did smooth
    assert f"smooth_quant: decisions written to calibration cache {cache}" in smooth_notes(cold)
    # Cold: one pass hashing the data (both keys share it), the statistics, the calibration.
    assert cold_data.passes == 3
    monkeypatch.setattr(qcompile.pipeline, "collect_channel_stats", no_statistics)
    monkeypatch.setattr(qcompile.pipeline, "calibrate", no_statistics)
    warm_data = CountingFeeds(_feeds())
    warm = compile_smoothed(cache, warm_data)
    assert warm_data.passes == 1  # only the hash both keys need
    assert warm.model.SerializeToString() == cold.model.SerializeToString()
    assert warm.report.calibration["cache_hit"]
    assert f"smooth_quant: decisions from calibration cache {cache} (no statistics pass)" in smooth_notes(warm)
    # The same notes (α, errors, where 1/s went) as the compile that searched.
    assert smooth_notes(warm)[:-1] == smooth_notes(cold)[:-1]
    monkeypatch.undo()
    plain = compile_smoothed(None)
    assert plain.model.graph.SerializeToString() == warm.model.graph.SerializeToString()


@pytest.mark.parametrize(
    "change, what",
    [
        ({"alphas": (0.5,)}, "settings"),
        ({"min_gain": 0.2}, "settings"),
        ({"rows": 64}, "settings"),
        ({"data": _feeds(seed=2)}, "data"),
        ({"model": to_proto(parse_model(LN_GROUP, _inits(seed=3)))}, "model"),
    ],
    ids=["alphas", "min-gain", "rows", "data", "weights"],
)
def test_stale_smoothquant_decisions_are_refused_before_any_data_pass(tmp_path, monkeypatch, change, what):
    cache = tmp_path / "ranges.json"
    compile_smoothed(cache)
    before = cache.read_bytes()
    monkeypatch.setattr(qcompile.pipeline, "collect_channel_stats", no_statistics)
    with pytest.raises(UsageError, match=rf"ranges.json \(its SmoothQuant decisions\) was made for another {what} \(fingerprint"):
        compile_smoothed(cache, **change)
    assert cache.read_bytes() == before


def test_the_smoothquant_key_covers_every_option_the_search_reads():
    def fingerprint(smooth=SmoothQuantOptions(), scheme=SchemeOptions(), calibration=CalibrationOptions()):
        settings = calibration_cache.smoothing_settings(smooth, scheme, calibration)
        return calibration_cache.CacheKey("m", "d", settings).fingerprint

    base = fingerprint()
    changed = [
        fingerprint(smooth=SmoothQuantOptions(alphas=(0.5,))),
        fingerprint(smooth=SmoothQuantOptions(min_gain=0.2)),
        fingerprint(smooth=SmoothQuantOptions(rows=64)),
        fingerprint(calibration=CalibrationOptions(seed=1)),
        fingerprint(calibration=CalibrationOptions(method="percentile")),
        fingerprint(calibration=CalibrationOptions(bins=1024)),
        fingerprint(calibration=CalibrationOptions(weight_method="mse")),
        fingerprint(scheme=SchemeOptions(activation_dtype="int8")),
        fingerprint(scheme=SchemeOptions(weight_granularity="per_tensor")),
    ]
    assert base not in changed and len(set(changed)) == len(changed)
    # What the search does not read leaves the key alone (a miss would only cost the data pass).
    assert fingerprint(calibration=CalibrationOptions(bias_correction_batches=4, max_samples=8)) == base


def test_an_old_format_cache_is_recomputed_not_refused(tmp_path):
    cache = tmp_path / "ranges.json"
    first = compile_smoothed(cache)
    content = json.loads(cache.read_text())
    del content["smooth_quant"]
    content["format"] = "qcompile-calibration-cache/1"  # the first format: ranges only
    cache.write_text(json.dumps(content))
    data = CountingFeeds(_feeds())
    again = compile_smoothed(cache, data)
    assert data.passes == 3 and not again.report.calibration["cache_hit"]
    assert again.model.SerializeToString() == first.model.SerializeToString()
    rewritten = json.loads(cache.read_text())
    assert rewritten["format"] == calibration_cache.FORMAT and rewritten["smooth_quant"]["groups"]


def test_a_missing_smoothquant_section_is_added_beside_the_ranges(tmp_path):
    cache = tmp_path / "ranges.json"
    first = compile_smoothed(cache)
    content = json.loads(cache.read_text())
    del content["smooth_quant"]
    cache.write_text(json.dumps(content))
    data = CountingFeeds(_feeds())
    again = compile_smoothed(cache, data)
    # Statistics recomputed (a miss), the ranges still a hit: hash + statistics.
    assert data.passes == 2 and again.report.calibration["cache_hit"]
    assert again.model.SerializeToString() == first.model.SerializeToString()
    rewritten = json.loads(cache.read_text())
    assert rewritten["smooth_quant"]["groups"] and {k: v for k, v in rewritten.items() if k != "smooth_quant"} == content


@pytest.mark.parametrize(
    "tamper",
    [
        lambda g: g.update(factors=["__import__('os')"]),
        lambda g: g.update(factors=[-1.0] * len(g["factors"])),
        lambda g: g.update(method="nearest"),
        lambda g: g.update(baseline=None),
    ],
    ids=["code", "negative", "method", "baseline"],
)
def test_smoothquant_entries_are_checked_as_data(tmp_path, tamper):
    cache = tmp_path / "ranges.json"
    compile_smoothed(cache)
    content = json.loads(cache.read_text())
    tamper(next(iter(content["smooth_quant"]["groups"].values())))
    cache.write_text(json.dumps(content))
    with pytest.raises(UsageError, match="the SmoothQuant entry of 'h' is damaged"):
        compile_smoothed(cache)
