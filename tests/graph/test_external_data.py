"""External data: locations that leave the model's folder are refused; large outputs are written
with their tensor data beside them (``<out>.data``), the data first and the model last."""

import os

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from qcompile.cli import main
from qcompile.errors import InvalidModelError, OutputExistsError
from qcompile.graph import io
from qcompile.graph.io import external_data_path, load_model, save_model_atomic
from tests.helpers import assert_numerically_close, count_ops, run

rng = np.random.default_rng(0)


def _model() -> onnx.ModelProto:
    proto = onnx.parser.parse_model(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[N,3,8,8] x) => (float[N,32] y) {
          c = Conv <pads=[1,1,1,1]> (x, w, b)
          r = Relu (c)
          p = GlobalAveragePool (r)
          f = Flatten (p)
          y = Gemm <transB=1> (f, fw, fb)
        }"""
    )
    arrays = dict(w=rng.normal(size=(16, 3, 3, 3)), b=rng.normal(size=16), fw=rng.normal(size=(32, 16)), fb=rng.normal(size=32))
    proto.graph.initializer.extend(onnx.numpy_helper.from_array(np.asarray(a, np.float32), n) for n, a in arrays.items())
    return proto


def _with_location(folder, location: str):
    """The model saved with external data in ``weights.bin``, its location then set to ``location``."""
    folder.mkdir(exist_ok=True)
    onnx.save(_model(), folder / "model.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="weights.bin", size_threshold=0)
    proto = onnx.load(folder / "model.onnx", load_external_data=False)
    for tensor in proto.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    path = folder / "edited.onnx"
    path.write_bytes(proto.SerializeToString())
    return path


@pytest.fixture
def secret(tmp_path):
    path = tmp_path / "secret.bin"
    path.write_bytes(rng.bytes(4096))
    return path


def test_inside_location_loads(tmp_path):
    path = _with_location(tmp_path / "m", "weights.bin")
    assert load_model(path).model.graph.initializers["w"].const_value.numpy().shape == (16, 3, 3, 3)


def test_dotdot_location_is_refused(tmp_path, secret):
    with pytest.raises(InvalidModelError, match="outside the model's folder"):
        load_model(_with_location(tmp_path / "m", "../secret.bin"))


def test_dotdot_that_comes_back_inside_is_allowed(tmp_path):
    (tmp_path / "m" / "sub").mkdir(parents=True)
    load_model(_with_location(tmp_path / "m", "sub/../weights.bin"))


def test_absolute_location_is_refused(tmp_path, secret):
    with pytest.raises(InvalidModelError, match="outside the model's folder"):
        load_model(_with_location(tmp_path / "m", str(secret)))


def test_absolute_location_inside_the_folder_is_refused_too(tmp_path):
    # Absolute paths are refused whatever they point at: a model file must not depend on where it lies.
    folder = tmp_path / "m"
    with pytest.raises(InvalidModelError, match="outside the model's folder"):
        load_model(_with_location(folder, str(folder / "weights.bin")))


def test_symlink_pointing_outside_is_refused(tmp_path, secret):
    folder = tmp_path / "m"
    folder.mkdir()
    os.symlink(secret, folder / "link.bin")
    with pytest.raises(InvalidModelError, match="outside the model's folder"):
        load_model(_with_location(folder, "link.bin"))


def test_symlinked_folder_pointing_outside_is_refused(tmp_path, secret):
    folder = tmp_path / "m"
    folder.mkdir()
    os.symlink(tmp_path, folder / "up")
    with pytest.raises(InvalidModelError, match="outside the model's folder"):
        load_model(_with_location(folder, "up/secret.bin"))


def test_symlink_inside_the_folder_is_refused_by_onnx(tmp_path):
    # onnx (1.23) reads no external data through a symlink at all; that is one line too.
    folder = tmp_path / "m"
    path = _with_location(folder, "alias.bin")
    os.symlink(folder / "weights.bin", folder / "alias.bin")
    with pytest.raises(InvalidModelError, match="symbolic link"):
        load_model(path)


@pytest.mark.parametrize("location", ["weights.bin\0.txt", "loop"])
def test_unresolvable_location_is_an_invalid_model(tmp_path, location):
    folder = tmp_path / "m"
    path = _with_location(folder, location)
    os.symlink("loop", folder / "loop")  # a symlink to itself
    with pytest.raises(InvalidModelError, match="cannot be resolved"):
        load_model(path)


@pytest.mark.parametrize("key, value, words", [
    ("offset", "100000", "exceeds"), ("length", "100000", "exceeds"), ("length", "-5", "non-negative"), ("offset", "x", "invalid"),
])
def test_bad_offsets_and_lengths(tmp_path, key, value, words):
    path = _with_location(tmp_path / "m", "weights.bin")
    proto = onnx.load(path, load_external_data=False)
    entries = proto.graph.initializer[0].external_data
    if not any(e.key == key for e in entries):
        entries.add(key=key, value=value)
    for entry in entries:
        if entry.key == key:
            entry.value = value
    path.write_bytes(proto.SerializeToString())
    with pytest.raises(InvalidModelError, match=words):
        load_model(path)


def test_cli_refuses_an_escaping_model_with_one_line(tmp_path, secret):
    path = _with_location(tmp_path / "m", "../secret.bin")
    result = CliRunner().invoke(main, ["compile", str(path), "-o", str(tmp_path / "o.onnx"), "--calib", "random"])
    assert result.exit_code == 3, result.output
    err = result.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err and "outside the model's folder" in err
    assert not (tmp_path / "o.onnx").exists()


# ---- writing large outputs ---------------------------------------------------------------------


def test_large_output_is_written_with_external_data_beside_it(tmp_path):
    proto = _model()
    before = proto.SerializeToString()
    out = tmp_path / "big.onnx"
    save_model_atomic(proto, out, external_data_threshold_bytes=1000)
    assert proto.SerializeToString() == before, "the caller's proto must be restored"
    assert sorted(os.listdir(tmp_path)) == ["big.onnx", "big.onnx.data"]
    assert external_data_path(out) == tmp_path / "big.onnx.data"
    stored = onnx.load(out, load_external_data=False)
    external = [t.name for t in stored.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external == ["w", "fw"]  # b and fb (64 and 128 bytes) stay inside the model file
    assert out.stat().st_size < 1000
    loaded = onnx.load(out)  # reads big.onnx.data
    x = {"x": rng.normal(size=(2, 3, 8, 8)).astype(np.float32)}
    assert_numerically_close(proto, loaded, x, rtol=0, atol_rel=0)
    assert count_ops(load_model(out).model) == count_ops(proto)


def test_small_output_stays_in_one_file(tmp_path):
    save_model_atomic(_model(), tmp_path / "small.onnx")
    assert os.listdir(tmp_path) == ["small.onnx"]


def test_external_data_write_is_deterministic_and_overwrites_with_force(tmp_path):
    out = tmp_path / "big.onnx"
    save_model_atomic(_model(), out, external_data_threshold_bytes=1000)
    first = out.read_bytes(), external_data_path(out).read_bytes()
    with pytest.raises(OutputExistsError):
        save_model_atomic(_model(), out, external_data_threshold_bytes=1000)
    save_model_atomic(onnx.load(out), out, force=True, external_data_threshold_bytes=1000)
    assert (out.read_bytes(), external_data_path(out).read_bytes()) == first
    assert sorted(os.listdir(tmp_path)) == ["big.onnx", "big.onnx.data"]


def test_stray_data_file_needs_force(tmp_path):
    out = tmp_path / "big.onnx"
    external_data_path(out).write_bytes(b"someone else's")
    with pytest.raises(OutputExistsError, match="big.onnx.data"):
        save_model_atomic(_model(), out, external_data_threshold_bytes=1000)
    assert not out.exists()


def test_failure_between_data_and_model_leaves_no_model(tmp_path, monkeypatch):
    out = tmp_path / "big.onnx"
    proto = _model()
    before = proto.SerializeToString()
    real = io.write_chunks_atomic

    def fail_on_model(path, chunks):
        if path == out:
            raise OSError("disk full")
        real(path, chunks)

    monkeypatch.setattr(io, "write_chunks_atomic", fail_on_model)
    with pytest.raises(OSError, match="disk full"):
        save_model_atomic(proto, out, external_data_threshold_bytes=1000)
    assert not out.exists()
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))
    assert proto.SerializeToString() == before


def test_compile_result_save_uses_external_data_above_the_threshold(tmp_path, monkeypatch):
    import qcompile

    monkeypatch.setattr(io, "EXTERNAL_DATA_THRESHOLD_BYTES", 200)
    feeds = [{"x": rng.normal(size=(2, 3, 8, 8)).astype(np.float32)} for _ in range(4)]
    result = qcompile.compile_model(_model(), feeds, qcompile.CompileOptions(show_progress=False))
    out = tmp_path / "q.onnx"
    result.save(out)
    assert sorted(os.listdir(tmp_path)) == ["q.onnx", "q.onnx.data", "q.onnx.report.json"]
    x = {"x": feeds[0]["x"]}
    np.testing.assert_array_equal(run(onnx.load(out), x)[0], run(result.model, x)[0])
