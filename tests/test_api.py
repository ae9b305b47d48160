"""compile_model end to end on small graphs with BatchNorm and Dropout; option bounds; the result object."""

import json

import numpy as np
import onnx
import pytest

import qcompile
from qcompile.errors import UsageError
from tests.helpers import count_ops, sqnr_db

rng = np.random.default_rng(0)

CONV_BN_DROPOUT = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N,3,8,8] x) => (float[N,5] y) {
  c1 = Conv <pads=[1,1,1,1]> (x, w1)
  b1 = BatchNormalization (c1, s1, o1, m1, v1)
  r1 = Relu(b1)
  d1 = Dropout (r1, ratio)
  c2 = Conv <pads=[1,1,1,1], group=4> (d1, w2, cb2)
  b2 = BatchNormalization (c2, s2, o2, m2, v2)
  r2 = Relu(b2)
  p = GlobalAveragePool(r2)
  f = Flatten(p)
  y = Gemm <transB=1> (f, fw, fb)
}"""


def conv_bn_dropout_model() -> onnx.ModelProto:
    proto = onnx.parser.parse_model(CONV_BN_DROPOUT)
    arrays = dict(
        w1=rng.normal(size=(4, 3, 3, 3)), w2=rng.normal(size=(4, 1, 3, 3)), cb2=rng.normal(size=4),
        fw=rng.normal(size=(5, 4)), fb=rng.normal(size=5), ratio=np.array(0.3),
    )
    for i in (1, 2):
        arrays.update({f"s{i}": rng.uniform(0.5, 2, 4), f"o{i}": rng.normal(size=4), f"m{i}": rng.normal(size=4),
                       f"v{i}": rng.uniform(0.5, 2, 4)})
    proto.graph.initializer.extend(onnx.numpy_helper.from_array(np.asarray(a, np.float32), n) for n, a in arrays.items())
    onnx.checker.check_model(proto)
    return proto


def feeds(n, batch=4):
    return [{"x": rng.normal(size=(batch, 3, 8, 8)).astype(np.float32)} for _ in range(n)]


def quiet(**kwargs):
    return qcompile.CompileOptions(show_progress=False, **kwargs)


def test_batchnorm_and_dropout_are_folded_and_output_is_close():
    proto = conv_bn_dropout_model()
    before = proto.SerializeToString()
    result = qcompile.compile_model(proto, feeds(10), quiet())
    assert proto.SerializeToString() == before
    ops = count_ops(result.model)
    assert ops["BatchNormalization"] == 0 and ops["Dropout"] == 0
    int32 = [t for t in result.model.graph.initializer if t.data_type == onnx.TensorProto.INT32 and len(t.dims) == 1 and t.dims[0] > 1]
    assert len(int32) == 3  # one int32 bias per Conv and the Gemm
    records = {p.name: p for p in result.report.passes}
    assert records["remove_dropout"].modified and records["remove_dropout"].nodes_after == records["remove_dropout"].nodes_before - 1
    assert records["fold_batchnorm"].nodes_before - records["fold_batchnorm"].nodes_after == 2
    assert result.verification.outputs[0].sqnr_db > 25
    assert "held-out" in result.report.verification["data"]
    import onnxruntime as ort

    x = feeds(1, 16)[0]
    ref = ort.InferenceSession(proto.SerializeToString()).run(None, x)[0]
    out = ort.InferenceSession(result.model.SerializeToString()).run(None, x)[0]
    assert sqnr_db(ref, out) > 25


def test_save_writes_report_then_model(tmp_path):
    result = qcompile.compile_model(conv_bn_dropout_model(), feeds(6), quiet(), verify_data=feeds(2))
    path = result.save(tmp_path / "q.onnx")
    report = json.loads((tmp_path / "q.onnx.report.json").read_text())
    assert report["output_path"] == str(path)
    assert report["size"]["quantized_bytes"] == path.stat().st_size
    with pytest.raises(qcompile.UsageError):
        result.save(path)


def test_max_opset_and_contrib_bounds():
    with pytest.raises(UsageError, match="max_opset"):
        qcompile.compile_model(conv_bn_dropout_model(), feeds(4), quiet(output=qcompile.OutputOptions(max_opset=15)))
    with pytest.raises(UsageError, match="below 13"):
        qcompile.OutputOptions(max_opset=12)
    proto = conv_bn_dropout_model()
    # A com.microsoft op in the input cannot satisfy --no-contrib-ops.
    proto.graph.node[-1].CopyFrom(onnx.helper.make_node("FusedGemm", ["f", "fw", "fb"], ["y"], domain="com.microsoft", transB=1))
    proto.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    with pytest.raises(UsageError, match="com.microsoft"):
        qcompile.compile_model(proto, feeds(4), quiet(output=qcompile.OutputOptions(allow_contrib_ops=False)))


def test_min_sqnr_verdict_in_result():
    options = quiet(verification=qcompile.VerificationOptions(min_sqnr=300.0))
    result = qcompile.compile_model(conv_bn_dropout_model(), feeds(6), options)
    assert not result.verification_passed and result.report.verification["verdict"].startswith("FAIL")


def test_torch_dataloader_as_calibration():
    torch = pytest.importorskip("torch")
    data = torch.utils.data.TensorDataset(torch.randn(12, 3, 8, 8))
    loader = torch.utils.data.DataLoader(data, batch_size=4)
    result = qcompile.compile_model(conv_bn_dropout_model(), loader, quiet(), verify_data=feeds(1))
    assert result.report.calibration["samples"] == 12
