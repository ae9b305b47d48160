"""The shared test helpers: build tiny graphs, run them in onnxruntime, compare, count ops."""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort


def parse_model(text: str, initializers: dict[str, np.ndarray] | None = None) -> ir.Model:
    """An ir.Model from ONNX text syntax, with numpy initializers added by name."""
    proto = onnx.parser.parse_model(text)
    for name, array in (initializers or {}).items():
        proto.graph.initializer.append(onnx.numpy_helper.from_array(np.asarray(array), name))
    onnx.checker.check_model(proto)
    return ir.from_proto(proto)


def to_proto(model: ir.Model | onnx.ModelProto) -> onnx.ModelProto:
    return model if isinstance(model, onnx.ModelProto) else ir.to_proto(model)


def run(model: ir.Model | onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.intra_op_num_threads = 1
    # Disable graph optimizations so the graph we built is the graph that runs.
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(to_proto(model).SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def assert_numerically_close(
    reference: ir.Model | onnx.ModelProto,
    candidate: ir.Model | onnx.ModelProto,
    feeds: dict[str, np.ndarray],
    *,
    rtol: float = 1e-5,
    atol_rel: float = 1e-5,
) -> None:
    """Outputs of two models on the same feeds agree: |a-b| <= atol_rel*max|ref| + rtol*|ref|."""
    ref_outputs = run(reference, feeds)
    cand_outputs = run(candidate, feeds)
    assert len(ref_outputs) == len(cand_outputs)
    for ref, cand in zip(ref_outputs, cand_outputs):
        assert ref.shape == cand.shape, (ref.shape, cand.shape)
        atol = atol_rel * float(np.max(np.abs(ref))) if ref.size else 0.0
        np.testing.assert_allclose(cand, ref, rtol=rtol, atol=atol)


def count_ops(model: ir.Model | onnx.ModelProto) -> Counter:
    if isinstance(model, onnx.ModelProto):
        return Counter(n.op_type for n in model.graph.node)
    return Counter(n.op_type for n in model.graph.all_nodes())


def sqnr_db(ref: np.ndarray, test: np.ndarray) -> float:
    noise = float(np.sum((ref.astype(np.float64) - test) ** 2))
    signal = float(np.sum(ref.astype(np.float64) ** 2))
    return float("inf") if noise == 0 else 10.0 * np.log10(signal / noise)
