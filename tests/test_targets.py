"""Target profiles end to end: tensorrt's Q/DQ form and its structure check, cuda's fp16, the report's
target and latency sections, and the CLI flags."""

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import qcompile
from qcompile.cli import main
from qcompile.errors import UsageError
from qcompile.targets import PROFILES, Precision, profile_for
from qcompile.verify.latency import batched_feed
from qcompile.verify.sessions import cuda_available
from qcompile.verify.structure import check_tensorrt_structure
from tests.helpers import count_ops, parse_model, to_proto

RESIDUAL = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N,3,8,8] x) => (float[N,5] y) {
  c1 = Conv <pads=[1,1,1,1]> (x, w1, b1)
  r1 = Relu(c1)
  c2 = Conv <pads=[1,1,1,1]> (r1, w2, b2)
  a = Add(c2, r1)
  r2 = Relu(a)
  p = GlobalAveragePool(r2)
  f = Flatten(p)
  y = Gemm <transB=1> (f, fw, fb)
}"""


def residual_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    arrays = dict(w1=rng.normal(size=(4, 3, 3, 3)), b1=rng.normal(size=4), w2=rng.normal(size=(4, 4, 3, 3)) * 0.3,
                  b2=rng.normal(size=4), fw=rng.normal(size=(5, 4)), fb=rng.normal(size=5))
    return to_proto(parse_model(RESIDUAL, {k: np.asarray(v, np.float32) for k, v in arrays.items()}))


def feeds(n, seed=1):
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(size=(2, 3, 8, 8)).astype(np.float32)} for _ in range(n)]


def options(target="cpu", latency=False, **kwargs):
    return qcompile.CompileOptions(target=target, show_progress=False,
                                   verification=qcompile.VerificationOptions(latency=latency), **kwargs)


def compile_for(target, **kwargs):
    return qcompile.compile_model(residual_model(), feeds(8), options(target, **kwargs), verify_data=feeds(3, seed=2))


# -- profiles --------------------------------------------------------------------------------


def test_every_target_has_a_profile_and_unknown_targets_are_refused():
    assert set(PROFILES) == set(qcompile.Target)
    assert profile_for("cpu").activation_dtype is None  # the scheme decides (uint8 by default)
    assert profile_for("tensorrt").activation_symmetric and not profile_for("tensorrt").int32_bias
    assert profile_for("cuda").precision == Precision.FP16
    with pytest.raises(UsageError, match="target must be one of"):
        qcompile.CompileOptions(target="tpu")


# -- tensorrt --------------------------------------------------------------------------------


def producers(model: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in model.graph.node for out in node.output}


def test_tensorrt_puts_symmetric_int8_qdq_on_op_inputs_only():
    result = compile_for("tensorrt")
    model = result.model
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    made_by = producers(model)
    qdq = [n for n in model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq
    for node in qdq:  # zero points: present, int8, all 0
        zero_point = inits[node.input[2]]
        assert zero_point.dtype == np.int8 and not zero_point.any()
    for node in model.graph.node:
        if node.op_type in ("Conv", "Gemm"):
            assert made_by[node.input[0]].op_type == "DequantizeLinear"
            assert made_by[node.input[1]].op_type == "DequantizeLinear"
            assert node.input[2] in inits and inits[node.input[2]].dtype == np.float32  # bias stays float
    # Q/DQ on inputs only: nothing quantizes a Conv/Gemm output, and no int32 bias exists.
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] in made_by:
            producer = made_by[node.input[0]]
            # SmoothQuant's float Mul may sit between Flatten and the Gemm (the classifier's input).
            assert producer.op_type in ("Relu", "Flatten") or (producer.op_type == "Mul" and "smooth" in producer.name)
    assert not any(a.dtype == np.int32 for a in inits.values())
    assert count_ops(model)["QuantizeLinear"] == 3  # x, r1 (read by c2 and the Add), f
    target = result.report.target
    assert target["name"] == "tensorrt" and target["structure"]["passed"]
    assert target["structure"]["quantized_ops"] == 3
    assert target["verified_on"] == "cpu" and target["verified_on_target"] is False
    assert target["note"].startswith("not verified on target")
    assert result.report.fusion is None  # onnxruntime CPU's fusion rules do not judge TensorRT's layout
    assert result.report.verification["min_sqnr_db"] > 25


def test_structure_check_fails_on_models_that_break_it():
    cpu = compile_for("cpu").model  # uint8 activations with nonzero zero points
    report = check_tensorrt_structure(cpu)
    assert not report.passed and any("uint8 zero point" in p for p in report.problems)

    model = compile_for("tensorrt").model
    assert check_tensorrt_structure(model).passed
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    conv.input[0] = "x"  # the first Conv now reads the float graph input
    report = check_tensorrt_structure(model)
    assert not report.passed and "comes from a graph input" in report.problems[0]
    assert "FAILED" in report.summary()
    model.opset_import[0].version = 12
    assert any("opset 12" in p for p in check_tensorrt_structure(model).problems)


def test_tensorrt_keep_float_ops_are_exempt_from_the_structure_check():
    result = compile_for("tensorrt", scheme=qcompile.SchemeOptions(keep_float=("Gemm",)))
    structure = result.report.target["structure"]
    assert structure["passed"] and len(structure["float_by_decision"]) == 1


# -- cuda ------------------------------------------------------------------------------------


def test_cuda_target_is_fp16_and_says_where_it_was_verified():
    result = compile_for("cuda")
    ops = count_ops(result.model)
    assert ops["QuantizeLinear"] == 0 and ops["Cast"] == 2  # in and out: every node fits fp16
    assert result.report.target["precision"] == {"fp16": 8}
    assert result.report.fusion is None  # no int8 kernels to check
    assert any(n.startswith("target cuda: nothing is quantized") for n in result.report.notes)
    assert result.report.verification["min_sqnr_db"] > 40
    target = result.report.target
    if cuda_available():
        assert target["verified_on"] == "cuda" and target["note"] is None
    else:
        assert target["verified_on"] == "cpu" and "not verified on target" in target["note"]
        assert "CUDAExecutionProvider" in target["note"]


def test_keep_float_keeps_cuda_nodes_in_fp32():
    result = compile_for("cuda", scheme=qcompile.SchemeOptions(keep_float=("Gemm",)))
    assert result.report.target["precision"] == {"fp16": 7, "fp32": 1}
    gemm = next(n for n in result.model.graph.node if n.op_type == "Gemm")
    weights = {t.name: t.data_type for t in result.model.graph.initializer}
    assert weights[gemm.input[1]] == onnx.TensorProto.FLOAT


@pytest.mark.gpu
def test_cuda_target_verifies_on_cuda():
    if not cuda_available():
        pytest.skip("onnxruntime's CUDA execution provider is not available")
    result = compile_for("cuda", latency=True)
    assert result.report.verification["provider"] == "cuda"
    assert result.report.target["verified_on_target"] is True
    assert result.report.latency["provider"] == "cuda"
    assert result.report.target["placement"]["memcpy_nodes"] == 0


# -- report: target and latency --------------------------------------------------------------


def test_cpu_report_has_target_and_latency_at_two_batch_sizes():
    result = compile_for("cpu", latency=True)
    report = result.report.to_json()
    assert report["options"]["target"] == "cpu"
    assert report["target"]["verified_on_target"] is True and report["target"]["note"] is None
    latency = report["latency"]
    assert latency["provider"] == "cpu" and latency["threads"] == 1 and latency["spinning"] is False
    assert [row["batch"] for row in latency["batches"]] == [1, 8]
    for row in latency["batches"]:
        assert row["float_median_ms"] > 0 and row["compiled_median_ms"] > 0 and row["runs"] >= 3
        assert row["speedup"] == pytest.approx(row["float_median_ms"] / row["compiled_median_ms"], rel=1e-2)
    text = result.report.render_text()
    assert "Latency (cpu, 1 thread(s)" in text and "Target" in text


def test_latency_off_leaves_it_out_and_keeps_the_model():
    on = compile_for("cpu", latency=True)
    off = compile_for("cpu", latency=False)
    assert off.report.latency is None and on.report.latency is not None
    strip = lambda m: [n.SerializeToString() for n in m.graph.node]  # noqa: E731
    assert strip(on.model) == strip(off.model)


def test_a_fixed_batch_dimension_skips_that_batch_size_with_a_reason():
    sample = {"x": np.zeros((3, 4), np.float32)}
    assert batched_feed(sample, {"x": None}, 8)["x"].shape == (8, 4)
    assert batched_feed(sample, {"x": 1}, 1)["x"].shape == (1, 4)
    assert batched_feed(sample, {"x": 1}, 8) == "input 'x' has a fixed batch dimension of 1"


def test_cli_target_and_no_latency(tmp_path):
    model_path, calib = tmp_path / "m.onnx", tmp_path / "calib.npz"
    onnx.save(residual_model(), model_path)
    np.savez(calib, x=np.random.default_rng(0).normal(size=(8, 3, 8, 8)).astype(np.float32))
    out = tmp_path / "q.onnx"
    result = CliRunner().invoke(main, ["compile", str(model_path), "-o", str(out), "--calib", str(calib),
                                       "--target", "tensorrt", "--no-latency", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["options"]["target"] == "tensorrt" and report["options"]["verification"]["latency"] is False
    assert report["target"]["name"] == "tensorrt" and report["latency"] is None
    bad = CliRunner().invoke(main, ["compile", str(model_path), "-o", str(tmp_path / "b.onnx"), "--calib", str(calib),
                                    "--target", "tpu"])
    assert bad.exit_code == 2


def test_latency_slower_than_float_is_a_warning_line():
    from qcompile.report.text import _latency_lines

    latency = {"provider": "cpu", "threads": 1, "batches": [
        {"batch": 1, "float_median_ms": 1.0, "compiled_median_ms": 1.25, "speedup": 0.8, "runs": 9},
        {"batch": 8, "float_median_ms": 4.0, "compiled_median_ms": 2.0, "speedup": 2.0, "runs": 9},
    ]}
    lines = _latency_lines(latency)
    assert lines[-1] == "WARNING: the compiled model ran slower than float at batch 1 (0.8x)"
    latency["batches"][0].update(compiled_median_ms=0.5, speedup=2.0)
    assert not any("WARNING" in line for line in _latency_lines(latency))
