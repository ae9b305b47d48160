"""Calibration data at the boundary of compile_model: empty data is an InvalidDataError; a single
constant sample compiles, and the report says that the data was one sample and which activations
had a zero range. (Names, shapes, dtypes, NaN/Inf and pickles: tests/test_data.py, tests/test_cli.py.)
"""

import json

import numpy as np
import pytest
from click.testing import CliRunner

import qcompile
from qcompile.cli import main
from qcompile.errors import InvalidDataError
from qcompile.options import VerificationOptions
from tests.helpers import run, to_proto
from tests.passes.test_annotate import conv_relu_pool_gemm

rng = np.random.default_rng(0)


def _options(verify: bool = True) -> qcompile.CompileOptions:
    return qcompile.CompileOptions(show_progress=False, verification=VerificationOptions(enabled=verify))


@pytest.mark.parametrize("verify", [True, False])
@pytest.mark.parametrize("empty", [[], (f for f in [])], ids=["list", "generator"])
def test_empty_calibration_data(empty, verify):
    with pytest.raises(InvalidDataError, match="empty|no calibration data"):
        qcompile.compile_model(to_proto(conv_relu_pool_gemm()), empty, _options(verify))


def test_npz_with_no_samples(tmp_path):
    path = tmp_path / "calib.npz"
    np.savez(path, x=np.zeros((0, 3, 8, 8), np.float32))
    with pytest.raises(InvalidDataError, match="holds no samples"):
        qcompile.compile_model(to_proto(conv_relu_pool_gemm()), path, _options())


def test_single_zero_sample_compiles_and_reports_the_zero_range():
    model = to_proto(conv_relu_pool_gemm())
    zeros = {"x": np.zeros((1, 3, 8, 8), np.float32)}
    result = qcompile.compile_model(model, [zeros], _options(verify=False))
    warnings = " | ".join(result.report.warnings)
    assert "calibrated on a single sample" in warnings
    assert "1 activation(s) were 0 on every calibration sample" in warnings and "'x'" in warnings
    assert "WARNING: 1 activation(s) were 0" in result.report.render_text()
    # Handled: the model runs and reproduces the only input it was calibrated on.
    np.testing.assert_allclose(run(result.model, zeros)[0], run(model, zeros)[0], rtol=0.05, atol=0.05)


def test_single_nonzero_constant_sample_is_reported_as_one_sample():
    model = to_proto(conv_relu_pool_gemm())
    result = qcompile.compile_model(model, [{"x": np.full((1, 3, 8, 8), 0.5, np.float32)}], _options(verify=False))
    assert any("single sample" in w for w in result.report.warnings)
    assert not any("zero range" in w for w in result.report.warnings)  # [0, 0.5] is a real range


def test_single_constant_sample_needs_verification_data_or_no_verify(tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes(to_proto(conv_relu_pool_gemm()).SerializeToString())
    calib = tmp_path / "one.npz"
    np.savez(calib, x=np.zeros((1, 3, 8, 8), np.float32))
    out = tmp_path / "o.onnx"
    result = CliRunner().invoke(main, ["compile", str(model), "-o", str(out), "--calib", str(calib)])
    assert result.exit_code == 4 and "single sample" in result.stderr, result.output
    result = CliRunner().invoke(main, ["compile", str(model), "-o", str(out), "--calib", str(calib), "--no-verify", "--json"])
    assert result.exit_code == 0, result.output
    assert any("zero range" in w for w in json.loads(result.stdout)["warnings"])
    assert out.exists()
