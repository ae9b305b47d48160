"""Interrupted compiles: SIGINT, SIGTERM or an exception while working or writing leaves no model at
the output path, no temporary files, and the input model as it was; the CLI says so in one line.

The output model is the commit point (data and report first, model last, each via a temporary
file in the same folder, fsync, rename), so the only states of the output path are: absent, the
old file, or the complete new model.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from qcompile.cli import main
from qcompile.graph import io
from tests.helpers import to_proto
from tests.passes.test_annotate import conv_relu_pool_gemm

rng = np.random.default_rng(0)


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _work(tmp_path, files: int):
    """A model, a calibration folder of ``files`` batches, and an empty output folder."""
    model = tmp_path / "model.onnx"
    onnx.save(to_proto(conv_relu_pool_gemm()), model)
    calib = tmp_path / "calib"
    calib.mkdir()
    for i in range(files):
        np.savez(calib / f"s{i:04d}.npz", x=rng.normal(size=(4, 3, 8, 8)).astype(np.float32))
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    return model, calib, out_dir


@pytest.fixture
def work(tmp_path):
    return _work(tmp_path, 6)


@pytest.fixture
def long_work(tmp_path):
    # Enough batches that calibration is still reading files when the signal comes (about 1 s).
    return _work(tmp_path, 400)


def _reading(pid: int, folder: Path) -> bool:
    """Whether the process has a file of ``folder`` open (Linux /proc)."""
    fd_dir = Path(f"/proc/{pid}/fd")
    try:
        entries = list(fd_dir.iterdir())
    except OSError:
        return False
    for entry in entries:
        try:
            if os.readlink(entry).startswith(str(folder)):
                return True
        except OSError:  # the descriptor closed meanwhile
            continue
    return False


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="needs /proc to see the compile mid-work")
@pytest.mark.parametrize("signum, exit_code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_during_compile_leaves_nothing(long_work, signum, exit_code):
    model, calib, out_dir = long_work
    before = sha(model)
    out = out_dir / "q.onnx"
    proc = subprocess.Popen(
        [sys.executable, "-m", "qcompile.cli", "compile", str(model), "-o", str(out), "--calib", str(calib), "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=out_dir,
    )
    try:
        deadline = time.monotonic() + 120
        while not _reading(proc.pid, calib):  # mid-calibration: reading the data
            assert proc.poll() is None, f"the compile ended before it was interrupted: {proc.communicate()}"
            assert time.monotonic() < deadline, "the compile never read its calibration data"
            time.sleep(0.002)
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == exit_code, stderr
    assert stderr.startswith("error: ") and stderr.count("\n") == 1 and "Traceback" not in stderr, stderr
    assert os.listdir(out_dir) == []  # no model, no report, no temporaries
    assert sha(model) == before


def _invoke(model, calib, out):
    return CliRunner().invoke(main, ["compile", str(model), "-o", str(out), "--calib", str(calib), "--quiet"])


def _after_fsync_of(monkeypatch, which: str, action) -> None:
    """Run ``action`` right after the temporary file of ``which`` ("model" or "report" of output
    q.onnx) is fsynced: its bytes are written, it is not yet renamed to its final name."""
    temporaries: dict[int, str] = {}
    real_mkstemp, real_fsync = io.tempfile.mkstemp, os.fsync

    def mkstemp(*args, **kwargs):
        fd, path = real_mkstemp(*args, **kwargs)
        name = os.path.basename(path)
        temporaries[fd] = "report" if name.startswith(".q.onnx.report.json.") else "model" if name.startswith(".q.onnx.") else ""
        return fd, path

    def fsync(fd):
        real_fsync(fd)
        if temporaries.get(fd) == which:
            action()

    monkeypatch.setattr(io.tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr(io.os, "fsync", fsync)


def test_sigterm_while_writing_the_model_leaves_no_model(work, monkeypatch):
    model, calib, out_dir = work
    out = out_dir / "q.onnx"
    before = sha(model)
    # A real SIGTERM, arriving once the model's temporary file is written and before its rename.
    _after_fsync_of(monkeypatch, "model", lambda: os.kill(os.getpid(), signal.SIGTERM))
    result = _invoke(model, calib, out)
    assert result.exit_code == 143, result.output
    assert result.stderr.strip() == "error: terminated (SIGTERM)"
    assert sorted(os.listdir(out_dir)) == ["q.onnx.report.json"]  # the report may stay; the model may not
    assert sha(model) == before
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the CLI put the previous handler back


@pytest.mark.parametrize("which, left", [("report", []), ("model", ["q.onnx.report.json"])])
@pytest.mark.parametrize("error, exit_code", [(KeyboardInterrupt, 130), (OSError, 70)])
def test_exception_while_writing_leaves_no_model_and_no_temporaries(work, monkeypatch, which, left, error, exit_code):
    model, calib, out_dir = work

    def fail():
        raise error("while writing")

    _after_fsync_of(monkeypatch, which, fail)
    result = _invoke(model, calib, out_dir / "q.onnx")
    assert result.exit_code == exit_code, result.output
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert sorted(os.listdir(out_dir)) == left


def test_failed_rename_of_the_model_keeps_the_old_output(work, monkeypatch):
    model, calib, out_dir = work
    out = out_dir / "q.onnx"
    out.write_bytes(b"the old model")
    real = os.replace

    def replace(src, dst):
        if Path(dst) == out:
            raise OSError("rename failed")
        real(src, dst)

    monkeypatch.setattr(io.os, "replace", replace)
    result = CliRunner().invoke(main, ["compile", str(model), "-o", str(out), "--calib", str(calib), "--quiet", "--force"])
    assert result.exit_code == 70, result.output
    assert out.read_bytes() == b"the old model"
    assert not [p for p in os.listdir(out_dir) if p.endswith(".tmp")]


def test_interrupt_with_json_is_one_json_line(work, monkeypatch):
    import json

    import qcompile.api

    model, calib, out_dir = work

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(qcompile.api, "compile_model", interrupted)
    result = CliRunner().invoke(main, ["compile", str(model), "-o", str(out_dir / "q.onnx"), "--calib", str(calib), "--json"])
    assert result.exit_code == 130
    assert json.loads(result.stdout) == {"error": "interrupted", "kind": "Interrupted", "exit_code": 130}
    assert os.listdir(out_dir) == []


def test_an_interrupt_python_swallowed_still_writes_nothing(work, monkeypatch):
    """CPython drops a KeyboardInterrupt raised inside some callbacks (an import lock's weakref
    callback): the compile then runs on. The CLI remembers the signal and writes no output."""
    import qcompile.api

    model, calib, out_dir = work
    real_compile = qcompile.api.compile_model

    def compile_then_swallow_a_ctrl_c(*args, **kwargs):
        result = real_compile(*args, **kwargs)
        class Callback:
            def __del__(self):  # CPython reports an exception here as unraisable and runs on
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1.0)  # the handler raises at the next bytecode boundary, inside __del__

        Callback()
        return result

    monkeypatch.setattr(qcompile.api, "compile_model", compile_then_swallow_a_ctrl_c)
    # CPython's own hook (pytest installs one that captures unraisable exceptions): it would print
    # "Exception ignored in ..." to stderr, which the CLI must keep to one line.
    monkeypatch.setattr(sys, "unraisablehook", sys.__unraisablehook__)
    result = CliRunner().invoke(main, ["compile", str(model), "-o", str(out_dir / "q.onnx"), "--calib", str(calib), "--quiet"])
    assert result.exit_code == 130, result.output
    assert result.output == "error: interrupted\n"  # one line: no "Exception ignored" traceback
    assert os.listdir(out_dir) == []
