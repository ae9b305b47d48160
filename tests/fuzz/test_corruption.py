"""Corrupted model files: random bit flips, byte overwrites, truncations, insertions and deletions of
a valid serialized model give our clean error, never another exception or a hang.

A corruption either breaks the file, and ``load_model`` raises InvalidModelError; or it still parses
as a valid but different model (a changed weight, name, shape, opset...), and then the compile must
succeed or fail with a QcompileError other than InternalError (an InternalError is a bug). Each
example runs under a ``signal.alarm`` watchdog; a few go through the real CLI in a subprocess with a
timeout (one line on stderr, exit code 3, no traceback).
"""

from __future__ import annotations

import signal
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qcompile
from qcompile.cli import main
from qcompile.errors import InternalError, InvalidModelError, QcompileError
from qcompile.graph.io import load_model

WATCHDOG_SECONDS = 60
DEFAULT_EXAMPLES = 200
SLOW_EXAMPLES = 3000

MODEL = """<ir_version: 8, opset_import: ["" : 17], doc_string: "a model to corrupt", producer_name: "qcompile-tests">
g (float[N,3,8,8] x) => (float[N,10] y) {
  c = Conv <pads=[1,1,1,1], strides=[1,1]> (x, w, cb)
  n = BatchNormalization <epsilon=1e-5> (c, s, o, m, v)
  r = Clip (n, lo, hi)
  d = Dropout (r, ratio)
  p = MaxPool <kernel_shape=[2,2], strides=[2,2]> (d)
  a = AveragePool <kernel_shape=[2,2], strides=[2,2]> (p)
  f = Flatten <axis=1> (a)
  y = Gemm <transB=1, alpha=1.0> (f, fw, fb)
}"""


def _valid_model_bytes() -> bytes:
    rng = np.random.default_rng(0)
    proto = onnx.parser.parse_model(MODEL)
    arrays = dict(
        w=rng.normal(size=(4, 3, 3, 3)), cb=rng.normal(size=4), s=rng.uniform(0.5, 2, 4), o=rng.normal(size=4),
        m=rng.normal(size=4), v=rng.uniform(0.5, 2, 4), lo=np.array(0.0), hi=np.array(6.0), ratio=np.array(0.2),
        fw=rng.normal(size=(10, 16)), fb=rng.normal(size=10),
    )
    proto.graph.initializer.extend(onnx.numpy_helper.from_array(np.asarray(a, np.float32), k) for k, a in arrays.items())
    proto.metadata_props.add(key="source", value="tests/fuzz/test_corruption.py")
    onnx.checker.check_model(proto, full_check=True)
    return proto.SerializeToString()


VALID = _valid_model_bytes()
_rng = np.random.default_rng(1)
CALIBRATION = [{"x": _rng.normal(size=(2, 3, 8, 8)).astype(np.float32)} for _ in range(4)]


# A corruption is a list of edits applied in order; positions are fractions of the current length.
_position = st.floats(0.0, 1.0, allow_nan=False)
_edit = st.one_of(
    st.tuples(st.just("flip"), _position, st.integers(0, 7)),
    st.tuples(st.just("set"), _position, st.integers(0, 255)),
    st.tuples(st.just("truncate"), _position),
    st.tuples(st.just("insert"), _position, st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("delete"), _position, st.integers(1, 16)),
)
corruptions = st.lists(_edit, min_size=1, max_size=4)


def corrupt(data: bytes, edits) -> bytes:
    out = bytearray(data)
    for kind, where, *arg in edits:
        pos = min(int(where * len(out)), max(len(out) - 1, 0))
        if kind == "flip" and out:
            out[pos] ^= 1 << arg[0]
        elif kind == "set" and out:
            out[pos] = arg[0]
        elif kind == "truncate":
            del out[pos:]
        elif kind == "insert":
            out[pos:pos] = arg[0]
        elif kind == "delete":
            del out[pos : pos + arg[0]]
    return bytes(out)


class _Hang(Exception):
    pass


@contextmanager
def watchdog(seconds: int = WATCHDOG_SECONDS):
    """Fail instead of hanging (SIGALRM: main thread, POSIX)."""

    def on_alarm(signum, frame):
        raise _Hang(f"no answer within {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def check_corrupted(data: bytes) -> str:
    """Load (and, if it loads, compile) the bytes; return what happened. Raises on anything unclean."""
    with tempfile.TemporaryDirectory() as folder, watchdog():
        path = Path(folder) / "model.onnx"
        path.write_bytes(data)
        try:
            load_model(path)
        except InvalidModelError as error:
            assert "\n" not in error.message
            return "refused"
        try:
            qcompile.compile_model(path, CALIBRATION, qcompile.CompileOptions(show_progress=False), verify_data=CALIBRATION)
        except InternalError:
            raise
        except QcompileError as error:
            assert "\n" not in error.message
            return f"compile: {type(error).__name__}"
        assert path.read_bytes() == data, "the input file was modified"
        return "compiled"


_SETTINGS = dict(
    deadline=None, derandomize=True, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@settings(max_examples=DEFAULT_EXAMPLES, **_SETTINGS)
@given(edits=corruptions)
def test_corrupted_model_gives_a_clean_error_or_compiles(edits):
    check_corrupted(corrupt(VALID, edits))


@pytest.mark.slow
@pytest.mark.fuzz_long
@settings(max_examples=SLOW_EXAMPLES, **_SETTINGS)
@given(edits=corruptions)
def test_corrupted_model_gives_a_clean_error_or_compiles_long(edits):
    check_corrupted(corrupt(VALID, edits))


def test_every_truncation_is_refused_or_compiles():
    # Every 7th prefix length, and the last bytes one by one (the end holds opset and metadata).
    lengths = sorted(set(range(0, len(VALID), 7)) | set(range(len(VALID) - 40, len(VALID))))
    outcomes = {n: check_corrupted(VALID[:n]) for n in lengths}
    assert outcomes[0] == "refused" and outcomes[len(VALID) // 2 // 7 * 7] == "refused"


# ---- the CLI: one line, exit code 3 ------------------------------------------------------------

REFUSED = [
    pytest.param(VALID[: len(VALID) // 3], id="truncated-third"),
    pytest.param(VALID[:-7], id="truncated-end"),
    pytest.param(b"\x08" + VALID[1:50], id="garbage-prefix"),
    pytest.param(VALID.replace(b"Conv", b"Cnov", 1), id="unknown-op"),
]


@pytest.mark.parametrize("data", REFUSED)
def test_cli_refuses_a_corrupted_model_with_one_line_and_exit_3(tmp_path, data):
    path = tmp_path / "model.onnx"
    path.write_bytes(data)
    out = tmp_path / "out.onnx"
    result = CliRunner().invoke(main, ["compile", str(path), "-o", str(out), "--calib", "random"])
    assert result.exit_code == 3, result.output
    err = result.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in result.output
    assert not out.exists() and path.read_bytes() == data


@pytest.mark.parametrize("data", REFUSED[:2])
def test_cli_subprocess_refuses_a_corrupted_model_within_a_timeout(tmp_path, data):
    path = tmp_path / "model.onnx"
    path.write_bytes(data)
    out = tmp_path / "out.onnx"
    proc = subprocess.run(
        [sys.executable, "-m", "qcompile.cli", "compile", str(path), "-o", str(out), "--calib", "random", "--json"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )
    assert proc.returncode == 3, proc.stderr
    assert '"exit_code": 3' in proc.stdout and proc.stdout.count("\n") == 1 and not proc.stderr
    assert not out.exists()
