import numpy as np
import onnx
import onnxruntime as ort
import pytest

from qcompile.errors import InvalidModelError, UsageError
from qcompile.verify import sessions
from qcompile.verify.sessions import cuda_available, make_session
from tests.verify.models import mlp, mlp_ir, numpy_mlp

X = np.random.default_rng(3).standard_normal((2, 4)).astype(np.float32)


@pytest.mark.parametrize("form", ["proto", "ir", "bytes", "path"])
def test_session_from_every_model_form(form, tmp_path):
    if form == "proto":
        model = mlp()
    elif form == "ir":
        model = mlp_ir()
    elif form == "bytes":
        model = mlp().SerializeToString()
    else:
        model = tmp_path / "m.onnx"
        onnx.save(mlp(), model)
    sess = make_session(model)
    assert sess.get_providers() == ["CPUExecutionProvider"]
    (y,) = sess.run(None, {"x": X})
    np.testing.assert_allclose(y, numpy_mlp(X)["y"], rtol=1e-5, atol=1e-5)


def test_session_options_are_set():
    sess = make_session(mlp(), intra_op_threads=2, optimization="disabled")
    so = sess.get_session_options()
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert so.intra_op_num_threads == 2
    assert so.inter_op_num_threads == 1
    assert so.graph_optimization_level == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    assert so.log_severity_level == 4


def test_invalid_models_are_one_line_errors(tmp_path):
    unknown_op = onnx.parser.parse_model(
        '<ir_version: 8, opset_import: ["" : 13]> g (float[1] x) => (float[1] y) { y = NoSuchOp(x) }'
    )
    with pytest.raises(InvalidModelError, match="onnxruntime cannot load the model") as info:
        make_session(unknown_op)
    assert "\n" not in str(info.value)
    with pytest.raises(InvalidModelError):
        make_session(b"not an onnx model")
    with pytest.raises(InvalidModelError, match="not found"):
        make_session(tmp_path / "missing.onnx")


def test_bad_arguments_are_usage_errors():
    with pytest.raises(UsageError, match="provider"):
        make_session(mlp(), "tpu")
    with pytest.raises(UsageError, match="optimization"):
        make_session(mlp(), optimization="max")
    with pytest.raises(UsageError, match="intra_op_threads"):
        make_session(mlp(), intra_op_threads=0)


def test_cuda_session_refused_without_cuda():
    if cuda_available():
        pytest.skip("the CUDA provider is present here")
    with pytest.raises(UsageError, match="CUDA provider not available"):
        make_session(mlp(), "cuda")


# onnxruntime warns that the (pretended) CUDA provider is not in its real list; that is the point.
@pytest.mark.filterwarnings("ignore:Specified provider")
def test_silent_cpu_fallback_is_caught(monkeypatch):
    """A build that lists CUDA but cannot load it falls back to the CPU; that must be refused."""
    if cuda_available():
        pytest.skip("the CUDA provider is present here")
    pretended = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: pretended)
    monkeypatch.setattr(sessions, "_preload_cuda_libraries", lambda: None)
    with pytest.raises(UsageError, match="CUDA provider not available: onnxruntime fell back"):
        make_session(mlp(), "cuda")


@pytest.mark.gpu
def test_cuda_session_runs_on_cuda():
    if not cuda_available():
        pytest.skip("onnxruntime's CUDA execution provider is not available")
    sess = make_session(mlp(), "cuda")
    assert sess.get_providers()[0] == "CUDAExecutionProvider"
    (y,) = sess.run(None, {"x": X})
    # The CUDA provider runs float MatMul in TF32 on Ampere and newer (10-bit mantissa) by default:
    # seen on an H200, errors near 1e-3 of the outputs' scale.
    scale = float(np.abs(numpy_mlp(X)["y"]).max())
    np.testing.assert_allclose(y, numpy_mlp(X)["y"], rtol=1e-2, atol=1e-2 * scale)
