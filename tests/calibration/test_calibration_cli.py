"""The calibration flags of ``qcompile compile``: each maps to its option field, defaults come from
the dataclass, the cache is written then used, and bad values are one-line usage errors."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from qcompile.cli import main
from qcompile.options import CalibrationOptions, CompileOptions
from tests.helpers import to_proto
from tests.passes.test_annotate import conv_relu_pool_gemm


@pytest.fixture
def model_and_data(tmp_path):
    model = tmp_path / "model.onnx"
    onnx.save(to_proto(conv_relu_pool_gemm()), model)
    data = tmp_path / "calib"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        np.savez(data / f"{i}.npz", x=rng.normal(size=(2, 3, 8, 8)).astype(np.float32))
    return model, data


def compile_(tmp_path, model, data, out, *flags):
    args = ["compile", model, "-o", tmp_path / out, "--calib", data, "--quiet", "--no-verify", *flags]
    return CliRunner().invoke(main, [str(a) for a in args])


def report(tmp_path, out) -> dict:
    return json.loads((tmp_path / f"{out}.report.json").read_text())


def test_defaults_are_the_dataclass_defaults(tmp_path, model_and_data):
    result = compile_(tmp_path, *model_and_data, "a.onnx")
    assert result.exit_code == 0, result.output
    assert report(tmp_path, "a.onnx")["options"]["calibration"] == CompileOptions().to_dict()["calibration"]


def test_flags_map_to_their_fields_and_the_cache_is_used(tmp_path, model_and_data):
    cache = tmp_path / "ranges.json"
    flags = ("--calibration-method", "percentile", "--percentile", "99.9", "--weight-method", "mse",
             "--calibration-cache", cache)
    result = compile_(tmp_path, *model_and_data, "a.onnx", *flags)
    assert result.exit_code == 0, result.output
    calibration = report(tmp_path, "a.onnx")["options"]["calibration"]
    expected = CalibrationOptions(method="percentile", percentile=99.9, weight_method="mse", cache=str(cache))
    assert calibration == CompileOptions(calibration=expected).to_dict()["calibration"]
    assert json.loads(cache.read_text())["key"]["settings"]["percentile"] == 99.9

    result = compile_(tmp_path, *model_and_data, "b.onnx", *flags)
    assert result.exit_code == 0, result.output
    assert report(tmp_path, "b.onnx")["calibration"]["cache_hit"] is True
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_stale_cache_is_a_one_line_usage_error(tmp_path, model_and_data):
    cache = tmp_path / "ranges.json"
    assert compile_(tmp_path, *model_and_data, "a.onnx", "--calibration-cache", cache).exit_code == 0
    result = compile_(tmp_path, *model_and_data, "b.onnx", "--calibration-cache", cache, "--calibration-method", "entropy")
    assert result.exit_code == 2
    err = result.stderr.strip()
    assert err.startswith("error: calibration cache") and "\n" not in err
    assert "was made for another settings" in err and "delete it or pass another path" in err
    assert not (tmp_path / "b.onnx").exists()


@pytest.mark.parametrize(
    "flags, words",
    [
        (("--percentile", "42"), "percentile must be in (50, 100]"),
        (("--calibration-method", "kl"), "Invalid value for '--calibration-method'"),
        (("--weight-method", "entropy"), "Invalid value for '--weight-method'"),
    ],
)
def test_bad_values_are_usage_errors(tmp_path, model_and_data, flags, words):
    result = compile_(tmp_path, *model_and_data, "a.onnx", *flags)
    assert result.exit_code == 2 and words in result.output
    assert not (tmp_path / "a.onnx").exists()
