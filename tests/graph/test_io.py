"""Loading (opset upgrade, external data, bad files) and atomic saving."""

import os

import numpy as np
import onnx
import pytest

from qcompile.errors import InvalidModelError, OutputExistsError
from qcompile.graph.io import load_model, save_model_atomic
from tests.helpers import assert_numerically_close, to_proto

rng = np.random.default_rng(0)


def _gemm_model(opset: int) -> onnx.ModelProto:
    proto = onnx.parser.parse_model(
        f"""<ir_version: 7, opset_import: ["" : {opset}]>
        g (float[N,8] x) => (float[N,4] y) {{ y = Gemm <transB=1> (x, w, b) }}"""
    )
    proto.graph.initializer.extend(
        [
            onnx.numpy_helper.from_array(rng.normal(size=(4, 8)).astype(np.float32), "w"),
            onnx.numpy_helper.from_array(rng.normal(size=4).astype(np.float32), "b"),
        ]
    )
    return proto


def test_old_opset_is_upgraded_with_a_note():
    proto = _gemm_model(11)
    loaded = load_model(proto)
    assert loaded.original_opset == 11
    assert loaded.model.opset_imports[""] == 13
    assert any("upgraded to 13" in n for n in loaded.notes)
    x = {"x": rng.normal(size=(3, 8)).astype(np.float32)}
    assert_numerically_close(proto, to_proto(loaded.model), x)


def test_model_proto_given_is_not_modified():
    proto = _gemm_model(17)
    before = proto.SerializeToString()
    loaded = load_model(proto)
    loaded.model.graph.initializers["w"].const_value = None
    assert proto.SerializeToString() == before


def test_external_data_loads_and_escaping_location_is_refused(tmp_path):
    proto = _gemm_model(17)
    weight = onnx.numpy_helper.to_array(proto.graph.initializer[0])
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    onnx.save(proto, model_dir / "model.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="weights.bin", size_threshold=0)
    loaded = load_model(model_dir / "model.onnx")
    np.testing.assert_array_equal(loaded.model.graph.initializers["w"].const_value.numpy(), weight)
    # Point the external data outside the model's folder.
    escaped = onnx.load(model_dir / "model.onnx", load_external_data=False)
    for tensor in escaped.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../secret.bin"
    (tmp_path / "secret.bin").write_bytes(b"\0" * 256)
    onnx.save(escaped, model_dir / "escaped.onnx")
    with pytest.raises(InvalidModelError, match="outside the model's folder"):
        load_model(model_dir / "escaped.onnx")


@pytest.mark.parametrize("content", [b"", b"not a model at all", None])
def test_bad_files_are_invalid_models(tmp_path, content):
    path = tmp_path / "bad.onnx"
    if content is None:
        good = _gemm_model(17).SerializeToString()
        path.write_bytes(good[: len(good) // 3])
    else:
        path.write_bytes(content)
    with pytest.raises(InvalidModelError):
        load_model(path)


def test_atomic_save_refuses_existing_and_leaves_no_temporaries(tmp_path):
    out = tmp_path / "out.onnx"
    out.write_bytes(b"old")
    with pytest.raises(OutputExistsError):
        save_model_atomic(_gemm_model(17), out)
    assert out.read_bytes() == b"old"
    save_model_atomic(_gemm_model(17), out, force=True)
    onnx.checker.check_model(onnx.load(out))
    assert sorted(os.listdir(tmp_path)) == ["out.onnx"]
