"""onnxruntime sessions for verification and latency, made the same way everywhere.

Every session names its execution providers explicitly: onnxruntime's defaults depend on the
installed build, and a CUDA session that cannot load CUDA quietly falls back to the CPU with only a
logged warning. So a ``"cuda"`` session is checked after creation and refused (``UsageError``) when
CUDA is not the provider actually in use.

Intra-op thread spinning is turned off in every session (see ``MEASURING.md``): with it on, the
threads of idle sessions keep spinning after their run and steal cores from the session being timed.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import os
from typing import Literal, Union

import onnx
import onnx_ir as ir
import onnxruntime as ort

from qcompile.errors import InvalidModelError, UsageError

logger = logging.getLogger(__name__)

Provider = Literal["cpu", "cuda"]
Optimization = Literal["all", "basic", "disabled"]
ModelSource = Union[onnx.ModelProto, ir.Model, bytes, str, os.PathLike]

_PROVIDER_NAMES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
_OPTIMIZATION_LEVELS = {
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
}


def make_session(
    model: ModelSource,
    provider: Provider = "cpu",
    *,
    intra_op_threads: int | None = None,
    optimization: Optimization = "all",
    profile_prefix: str | None = None,
) -> ort.InferenceSession:
    """An ``InferenceSession`` on ``provider`` ("cpu" or "cuda").

    ``model`` is an ``onnx.ModelProto``, an ``ir.Model``, serialized bytes or a path (a path is
    handed to onnxruntime as is, so external data next to it is found). ``intra_op_threads=None``
    leaves onnxruntime's default (one thread per physical core). ``optimization`` is the graph
    optimization level: "all" runs what a deployment runs (QDQ pairs fused into int8 kernels),
    "disabled" runs the graph exactly as written. ``profile_prefix``: onnxruntime profiles every
    run into a JSON file with that prefix (``session.end_profiling()`` returns its path).

    Raises ``UsageError`` for an unknown provider or level, or when CUDA is asked for and not
    usable, and ``InvalidModelError`` when onnxruntime refuses the model.
    """
    if provider not in _PROVIDER_NAMES:
        raise UsageError(f"unknown provider {provider!r}; expected one of {sorted(_PROVIDER_NAMES)}")
    if optimization not in _OPTIMIZATION_LEVELS:
        raise UsageError(
            f"unknown optimization level {optimization!r}; expected one of {sorted(_OPTIMIZATION_LEVELS)}"
        )
    if intra_op_threads is not None and intra_op_threads < 1:
        raise UsageError(f"intra_op_threads must be at least 1, got {intra_op_threads}")

    so = ort.SessionOptions()
    so.log_severity_level = 4  # fatal only: errors reach the user as our one-line messages; the CUDA fallback warning is replaced by our own check
    so.inter_op_num_threads = 1
    if intra_op_threads is not None:
        so.intra_op_num_threads = intra_op_threads
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    so.graph_optimization_level = _OPTIMIZATION_LEVELS[optimization]
    if profile_prefix is not None:
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix

    if provider == "cuda":
        _require_cuda_build()
        _preload_cuda_libraries()
    source = _session_source(model)
    try:
        # CPU is listed after CUDA so that nodes without a CUDA kernel still run.
        providers = [_PROVIDER_NAMES[provider]] + (["CPUExecutionProvider"] if provider == "cuda" else [])
        session = ort.InferenceSession(source, so, providers=providers)
    except Exception as exc:  # onnxruntime's pybind errors derive from Exception only
        raise InvalidModelError(f"onnxruntime cannot load the model: {exc}") from None

    if provider == "cuda" and session.get_providers()[0] != "CUDAExecutionProvider":
        raise UsageError(
            "CUDA provider not available: onnxruntime fell back to "
            f"{session.get_providers()[0]} (CUDA or cuDNN libraries not found?)"
        )
    return session


@functools.lru_cache(maxsize=1)
def cuda_available() -> bool:
    """Whether a session on the CUDA provider really runs on CUDA (checked once, on a tiny model)."""
    try:
        make_session(_tiny_model(), "cuda")
    except UsageError:
        return False
    return True


def _require_cuda_build() -> None:
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" not in available:
        raise UsageError(
            f"CUDA provider not available: this onnxruntime build offers {', '.join(available)} "
            "(install onnxruntime-gpu)"
        )


@functools.lru_cache(maxsize=1)
def _preload_cuda_libraries() -> None:
    """Let onnxruntime-gpu find the CUDA/cuDNN libraries (for example those torch installed).

    ``preload_dlls`` prints its warnings; nothing below the CLI prints, so they go to the log.
    """
    preload = getattr(ort, "preload_dlls", None)
    if preload is None:
        return
    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        try:
            preload()
        except OSError as exc:  # a missing library shows up in the provider check that follows
            logger.debug("onnxruntime.preload_dlls failed: %s", exc)
    if captured.getvalue().strip():
        logger.debug("onnxruntime.preload_dlls: %s", captured.getvalue().strip())


def _session_source(model: ModelSource) -> bytes | str:
    if isinstance(model, ir.Model):
        return ir.to_proto(model).SerializeToString()
    if isinstance(model, onnx.ModelProto):
        return model.SerializeToString()
    if isinstance(model, bytes):
        return model
    if isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        if not os.path.isfile(path):
            raise InvalidModelError(f"model file not found: {path}")
        return path
    raise UsageError(f"cannot make a session from a {type(model).__name__}")


def _tiny_model() -> onnx.ModelProto:
    return onnx.parser.parse_model(
        """
        <ir_version: 8, opset_import: ["" : 13]>
        probe (float[1] x) => (float[1] y) { y = Identity(x) }
        """
    )
