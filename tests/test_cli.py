"""The CLI through click's runner: happy paths, and bad input → one line + exit code, nothing written."""

import hashlib
import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from qcompile.cli import main
from tests.helpers import count_ops, to_proto
from tests.passes.test_annotate import conv_relu_pool_gemm

rng = np.random.default_rng(0)


@pytest.fixture
def model_path(tmp_path):
    path = tmp_path / "model.onnx"
    onnx.save(to_proto(conv_relu_pool_gemm()), path)
    return path


@pytest.fixture
def calib_dir(tmp_path):
    folder = tmp_path / "calib"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(6):
        np.savez(folder / f"s{i}.npz", x=rng.normal(size=(2, 3, 8, 8)).astype(np.float32))
    return folder


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_one_line_error(result, code, *words):
    assert result.exit_code == code, result.output
    err = result.stderr.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    assert "Traceback" not in result.output
    for word in words:
        assert word in err, err


def test_compile_writes_model_and_report_and_leaves_input_alone(tmp_path, model_path, calib_dir):
    before = sha(model_path)
    out = tmp_path / "out.onnx"
    result = invoke("compile", model_path, "-o", out, "--calib", calib_dir, "--quiet")
    assert result.exit_code == 0, result.output
    assert sha(model_path) == before
    model = onnx.load(out)
    onnx.checker.check_model(model, full_check=True)
    assert count_ops(model)["QuantizeLinear"] > 0
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["qcompile.version"] and len(meta["qcompile.calibration_fingerprint"]) == 64
    assert json.loads(meta["qcompile.options"])["scheme"]["activation_dtype"] == "uint8"
    report = json.loads((tmp_path / "out.onnx.report.json").read_text())
    assert report["verification"]["outputs"][0]["sqnr_db"] > 25
    assert [p["name"] for p in report["passes"]][:3] == ["name_nodes", "remove_dropout", "fold_constants"]
    assert not list(tmp_path.glob("*.tmp"))


def test_compile_prints_readable_report(tmp_path, model_path, calib_dir):
    result = invoke("compile", model_path, "-o", tmp_path / "o.onnx", "--calib", calib_dir)
    assert result.exit_code == 0, result.output
    for section in ("Passes", "Quantization", "Size", "Calibration", "Verification", "SQNR"):
        assert section in result.stdout


def test_same_inputs_give_identical_bytes(tmp_path, model_path, calib_dir):
    for name in ("a.onnx", "b.onnx"):
        assert invoke("compile", model_path, "-o", tmp_path / name, "--calib", calib_dir, "--quiet").exit_code == 0
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


def test_existing_output_needs_force(tmp_path, model_path, calib_dir):
    out = tmp_path / "out.onnx"
    out.write_bytes(b"keep me")
    assert_one_line_error(invoke("compile", model_path, "-o", out, "--calib", calib_dir), 2, "--force")
    assert out.read_bytes() == b"keep me"
    assert invoke("compile", model_path, "-o", out, "--calib", calib_dir, "--force", "--quiet").exit_code == 0
    onnx.checker.check_model(onnx.load(out))


def test_bad_models(tmp_path, model_path, calib_dir):
    out = tmp_path / "out.onnx"
    assert_one_line_error(invoke("compile", tmp_path / "nope.onnx", "-o", out, "--calib", calib_dir), 3, "not found")
    text = tmp_path / "text.onnx"
    text.write_text("this is not a model")
    assert_one_line_error(invoke("compile", text, "-o", out, "--calib", calib_dir), 3)
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(model_path.read_bytes()[: model_path.stat().st_size // 2])
    assert_one_line_error(invoke("compile", truncated, "-o", out, "--calib", calib_dir), 3)
    assert not out.exists()


@pytest.mark.parametrize(
    "arrays, words",
    [
        ({"image": np.zeros((1, 3, 8, 8), np.float32)}, ["lacks input 'x'"]),
        ({"x": np.zeros((1, 3, 7, 7), np.float32)}, ["shape"]),
        ({"x": np.zeros((1, 3, 8, 8), np.int8)}, ["dtype"]),
        ({"x": np.full((1, 3, 8, 8), np.nan, np.float32)}, ["NaN"]),
    ],
)
def test_bad_calibration_data(tmp_path, model_path, arrays, words):
    folder = tmp_path / "bad"
    folder.mkdir()
    np.savez(folder / "a.npz", **arrays)
    np.savez(folder / "b.npz", **arrays)
    out = tmp_path / "out.onnx"
    assert_one_line_error(invoke("compile", model_path, "-o", out, "--calib", folder), 4, *words)
    assert not out.exists()


def test_min_sqnr_gate_fails_without_writing_model(tmp_path, model_path, calib_dir):
    out = tmp_path / "out.onnx"
    result = invoke("compile", model_path, "-o", out, "--calib", calib_dir, "--min-sqnr", "200", "--quiet")
    assert_one_line_error(result, 5, "FAIL")
    assert not out.exists()
    report = json.loads((tmp_path / "out.onnx.report.json").read_text())
    assert report["verification"]["passed"] is False


def test_random_calibration_is_loud(tmp_path, model_path):
    result = invoke("compile", model_path, "-o", tmp_path / "o.onnx", "--calib", "random")
    assert result.exit_code == 0, result.output
    assert "WARNING: calibrated on RANDOM data" in result.stdout


def test_json_error_output(tmp_path, calib_dir):
    result = invoke("compile", tmp_path / "missing.onnx", "-o", tmp_path / "o.onnx", "--calib", calib_dir, "--json")
    assert result.exit_code == 3
    payload = json.loads(result.stdout)
    assert payload["exit_code"] == 3 and payload["kind"] == "InvalidModelError"


def test_verify_and_inspect(tmp_path, model_path, calib_dir):
    out = tmp_path / "q.onnx"
    assert invoke("compile", model_path, "-o", out, "--calib", calib_dir, "--quiet").exit_code == 0
    result = invoke("verify", model_path, out, "--data", calib_dir, "--per-layer", "--json")
    assert result.exit_code == 0, result.output
    verdict = json.loads(result.stdout)
    assert verdict["passed"] and verdict["outputs"][0]["sqnr_db"] > 25 and verdict["layers"]
    assert_one_line_error(invoke("verify", model_path, out, "--data", calib_dir, "--min-sqnr", "300"), 5)
    result = invoke("inspect", model_path)
    assert result.exit_code == 0, result.output
    assert "would quantize" in result.stdout and "Conv×1" in result.stdout


def test_unknown_op_stays_float_with_reason(tmp_path, calib_dir):
    text = """<ir_version: 8, opset_import: ["" : 17]>
    g (float[N,3,8,8] x) => (float[N,3,8,8] y) {
      c = Conv <pads=[1,1,1,1]> (x, w)
      y = Softmax <axis=1> (c)
    }"""
    proto = onnx.parser.parse_model(text)
    proto.graph.initializer.append(onnx.numpy_helper.from_array(rng.normal(size=(3, 3, 3, 3)).astype(np.float32), "w"))
    path = tmp_path / "softmax.onnx"
    onnx.save(proto, path)
    result = invoke("compile", path, "-o", tmp_path / "o.onnx", "--calib", calib_dir, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    floats = report["quantization"]["float_nodes"]
    assert [f["op_type"] for f in floats] == ["Softmax"] and "not in the op table" in floats[0]["reason"]


def test_verify_on_cuda_without_the_provider_is_a_usage_error(tmp_path, model_path, calib_dir):
    from qcompile.verify.sessions import cuda_available

    if cuda_available():
        pytest.skip("the CUDA provider is present here; tests/gpu covers it")
    out = tmp_path / "q.onnx"
    assert invoke("compile", model_path, "-o", out, "--calib", calib_dir, "--quiet").exit_code == 0
    assert_one_line_error(invoke("verify", model_path, out, "--data", calib_dir, "--provider", "cuda"), 2, "CUDA")


@pytest.mark.gpu
def test_verify_on_cuda(tmp_path, model_path, calib_dir):
    from qcompile.verify.sessions import cuda_available

    if not cuda_available():
        pytest.skip("onnxruntime's CUDA execution provider is not available")
    out = tmp_path / "q.onnx"
    assert invoke("compile", model_path, "-o", out, "--calib", calib_dir, "--quiet").exit_code == 0
    result = invoke("verify", model_path, out, "--data", calib_dir, "--provider", "cuda", "--json")
    assert result.exit_code == 0, result.output
    verdict = json.loads(result.stdout)
    assert verdict["provider"] == "cuda" and verdict["outputs"][0]["sqnr_db"] > 25


def test_strict_fusion_passes_on_a_fused_model_and_report_says_fused(tmp_path, model_path, calib_dir):
    out = tmp_path / "q.onnx"
    result = invoke("compile", model_path, "-o", out, "--calib", calib_dir, "--strict-fusion", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["options"]["verification"]["strict_fusion"] is True
    assert report["fusion"]["fused"] and report["fusion"]["int8_kernels"]["QLinearConv"] == 1


def test_post_training_algorithm_flags_reach_the_options_and_the_pipeline(tmp_path, model_path, calib_dir):
    out = tmp_path / "q.onnx"
    result = invoke(
        "compile", model_path, "-o", out, "--calib", calib_dir, "--equalize-cross-layer", "--weight-rounding", "optimized", "--json"
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["options"]["calibration"]["equalize_cross_layer"] is True
    assert report["options"]["calibration"]["weight_rounding"] == "optimized"
    names = [p["name"] for p in report["passes"]]
    assert "equalize_cross_layer" in names and "round_weights" in names


def _parsed_options(*args):
    from qcompile.cli import _options_from_flags, compile_command

    context = compile_command.make_context("compile", ["m.onnx", "-o", "out.onnx", "--calib", "random", *args])
    positional = ("model", "output", "calibration", "verify_data", "force", "as_json")
    return _options_from_flags({k: v for k, v in context.params.items() if k not in positional})


def test_smooth_quant_and_activation_matmul_flags_map_to_their_fields():
    from qcompile.options import CompileOptions

    defaults = _parsed_options()
    assert defaults.smooth_quant == CompileOptions().smooth_quant and defaults.scheme.quantize_activation_matmuls
    options = _parsed_options("--no-smooth-quant", "--smooth-quant-alphas", "0.5,0.7", "--smooth-quant-min-gain", "0.2",
                              "--smooth-quant-rows", "64", "--no-quantize-activation-matmuls")
    assert not options.smooth_quant.enabled and options.smooth_quant.alphas == (0.5, 0.7)
    assert options.smooth_quant.min_gain == 0.2 and options.smooth_quant.rows == 64
    assert not options.scheme.quantize_activation_matmuls


def test_fuse_sibling_matmuls_flag_maps_to_its_field():
    assert _parsed_options().scheme.fuse_sibling_matmuls
    assert not _parsed_options("--no-fuse-sibling-matmuls").scheme.fuse_sibling_matmuls


@pytest.mark.parametrize("flag, dynamic", [(None, True), ("--no-dynamic-matmul", False)])
def test_dynamic_matmul_flag(tmp_path, flag, dynamic):
    from tests.passes.test_quantize_dynamic_matmul import ONE_MATMUL, _model

    model = tmp_path / "ln_matmul.onnx"
    onnx.save(to_proto(_model(ONE_MATMUL)()), model)
    calib = tmp_path / "calib_ln"
    calib.mkdir()
    rng = np.random.default_rng(1)
    for i in range(6):
        np.savez(calib / f"s{i}.npz", x=rng.normal(size=(2, 5, 16)).astype(np.float32))
    out = tmp_path / "q.onnx"
    result = invoke("compile", model, "-o", out, "--calib", calib, "--json", *([flag] if flag else []))
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["options"]["scheme"]["dynamic_matmul"] is dynamic
    ops = count_ops(onnx.load(out))
    assert (ops["DynamicQuantizeLinear"], ops["QuantizeLinear"]) == ((1, 0) if dynamic else (0, 1))
