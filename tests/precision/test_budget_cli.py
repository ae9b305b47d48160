"""--precision and --budget on the command line: parsed into options, bad input is one line (exit 2)."""

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from qcompile.cli import main
from qcompile.errors import UsageError
from qcompile.precision.budget import mean_sample_cosine, min_sqnr_db, parse_budget, top1_drop_points
from tests.helpers import to_proto
from tests.precision.models import chain, feeds


@pytest.fixture
def paths(tmp_path):
    model = tmp_path / "model.onnx"
    onnx.save(to_proto(chain()), model)
    calib = tmp_path / "calib"
    calib.mkdir()
    for i, feed in enumerate(feeds(10)):
        np.savez(calib / f"s{i}.npz", **feed)
    return model, calib, tmp_path / "out.onnx"


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--budget", "cosine>0.9", "METRIC>=VALUE"),
        ("--budget", "accuracy>=0.9", "metric must be one of"),
        ("--budget", "sqnr<=30", "sqnr takes >="),
        ("--budget", "cosine>=2", "a cosine is in [-1, 1]"),
        ("--precision", "mm1", "PATTERN=PRECISION"),
        ("--precision", "mm1=int3", "precision must be one of"),
        ("--precision", "mm1=int16", "no int16 kernels"),
    ],
)
def test_bad_precision_flags_are_one_line(paths, flag, value, message):
    model, calib, out = paths
    result = CliRunner().invoke(main, ["compile", str(model), "-o", str(out), "--calib", str(calib), flag, value])
    assert result.exit_code == 2
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output
    assert not out.exists()


def test_budget_parsing_and_values():
    ref = [[np.array([[1.0, 0.0], [0.0, 1.0]])]]
    test = [[np.array([[1.0, 0.1], [0.2, 0.1]])]]
    assert parse_budget("top1-drop<=50").evaluate(ref, test) == (50.0, True)
    assert parse_budget("top1-drop<=10").evaluate(ref, test)[1] is False
    cos = mean_sample_cosine(ref, test)
    expected = np.mean([1 / np.sqrt(1.01), 0.1 / np.sqrt(0.05)])
    assert cos == pytest.approx(expected)
    assert min_sqnr_db(ref, test) == pytest.approx(10 * np.log10(2 / (0.01 + 0.04 + 0.81)))
    assert top1_drop_points(ref, ref) == 0.0
    with pytest.raises(UsageError, match="--recipe replays"):
        from qcompile.options import PrecisionOptions

        PrecisionOptions(budget="sqnr>=30", recipe="r.json")
