"""Verification: onnxruntime sessions (CPU / CUDA), output and per-layer comparisons, latency.

This room sits below the pipeline and the API: it imports only ``qcompile.errors`` and the
libraries, and takes models as ``onnx.ModelProto`` / ``ir.Model`` and feeds as dicts of arrays.
"""

from qcompile.verify.compare import LayerMetrics, VerificationResult, compare_models, run_model
from qcompile.verify.latency import LatencyResult, measure_latency
from qcompile.verify.metrics import OutputComparison, OutputMetrics, compare_arrays
from qcompile.verify.sessions import cuda_available, make_session

__all__ = [
    "LatencyResult",
    "LayerMetrics",
    "OutputComparison",
    "OutputMetrics",
    "VerificationResult",
    "compare_arrays",
    "compare_models",
    "cuda_available",
    "make_session",
    "measure_latency",
    "run_model",
]
