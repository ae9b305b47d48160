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
