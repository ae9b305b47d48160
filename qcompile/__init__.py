"""qcompile: an ahead-of-time quantization compiler for ONNX models.

Public API::

    result = qcompile.compile_model("model.onnx", "calib/", qcompile.CompileOptions())
    result.save("model.int8.onnx")          # and model.int8.onnx.report.json
    print(result.report.render_text())
"""

__version__ = "0.1.0"

from qcompile.api import CompileResult, compile_model, verify  # noqa: E402
from qcompile.errors import (  # noqa: E402
    InvalidDataError,
    InvalidModelError,
    QcompileError,
    UsageError,
    VerificationFailedError,
)
from qcompile.options import (  # noqa: E402
    ActivationDType,
    CalibrationMethod,
    CalibrationOptions,
    CompileOptions,
    OutputOptions,
    PrecisionOptions,
    SchemeOptions,
    Target,
    SmoothQuantOptions,
    VerificationOptions,
    WeightGranularity,
    WeightMethod,
    WeightRounding,
)



def export_torch(*args, **kwargs):
    """Export a PyTorch module to ONNX (see ``qcompile.frontends.torch_export``; torch imported lazily)."""
    from qcompile.frontends.torch_export import export_torch as _export_torch

    return _export_torch(*args, **kwargs)


__all__ = [
    "ActivationDType",
    "CalibrationMethod",
    "CalibrationOptions",
    "CompileOptions",
    "CompileResult",
    "InvalidDataError",
    "InvalidModelError",
    "OutputOptions",
    "QcompileError",
    "SchemeOptions",
    "Target",
    "SmoothQuantOptions",
    "UsageError",
    "VerificationFailedError",
    "VerificationOptions",
    "WeightGranularity",
    "WeightMethod",
    "WeightRounding",
    "__version__",
    "compile_model",
    "export_torch",
    "verify",
]
