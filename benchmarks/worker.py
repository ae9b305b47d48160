"""One compile in its own process: ``python -m benchmarks.worker REQUEST.json`` (repo root on PYTHONPATH).

The request (written by ``benchmarks.measure.compile_in_child``) names the tool, its parameters,
the float model file, the calibration folder (one ``.npz`` per feed, read in name order) and where
to write the quantized model and the result. The result JSON holds ``ok``, ``seconds`` (from
loading the model to the written output: pre-processing, calibration, quantization, saving; the
interpreter start and the tool's imports are left out), ``notes`` (what the tool needed, e.g. a
retried pre-processing), ``error`` (one line) and ``vmhwm_kib`` (this process's peak RSS).

Every tool gets the same feeds: qcompile reads the folder itself; the others get the arrays.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np


def read_feeds(folder: str | Path) -> list[dict[str, np.ndarray]]:
    feeds = []
    for path in sorted(Path(folder).glob("*.npz")):
        with np.load(path, allow_pickle=False) as data:
            feeds.append({name: data[name] for name in data.files})
    return feeds


def compile_qcompile(request: dict[str, Any], notes: list[str]) -> None:
    import onnx

    import qcompile

    params = request["params"]
    options = qcompile.CompileOptions(
        scheme=qcompile.SchemeOptions(**params.get("scheme", {})),
        calibration=qcompile.CalibrationOptions(**params.get("calibration", {})),
        smooth_quant=qcompile.SmoothQuantOptions(**params.get("smooth_quant", {})),
        # The peers do not verify; the metric is measured on the evaluation data by the runner.
        verification=qcompile.VerificationOptions(enabled=False),
        show_progress=False,
    )
    result = qcompile.compile_model(request["model"], request["calibration"], options)
    onnx.save(result.model, request["output"])
    left = sorted({n.op_type for n in result.report.quantization.float_nodes if not n.shape_arithmetic})
    if left:
        notes.append(f"float by decision: {', '.join(left)}")


def _pre_process(model: str, out: Path, notes: list[str]) -> str:
    """onnxruntime's ``quant_pre_process``; retried without symbolic shape inference when that fails."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(model, str(out))
    except Exception as exc:  # symbolic shape inference raises assorted types on real models
        notes.append(f"quant_pre_process failed ({type(exc).__name__}: {_first_line(exc)}); retried with skip_symbolic_shape=True")
        quant_pre_process(model, str(out), skip_symbolic_shape=True)
    return str(out)


class _Reader:
    """onnxruntime's CalibrationDataReader over a list of feeds."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self._iter = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._iter, None)


def compile_ort_static(request: dict[str, Any], notes: list[str]) -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    params = request["params"]
    reader_type = type("FeedReader", (_Reader, CalibrationDataReader), {})
    with tempfile.TemporaryDirectory(prefix="qcompile-bench-ort-") as tmp:
        model = _pre_process(request["model"], Path(tmp) / "pre.onnx", notes)
        quantize_static(
            model,
            request["output"],
            reader_type(read_feeds(request["calibration"])),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type={"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}[params["activation_type"]],
            weight_type=QuantType.QInt8,
            calibrate_method={
                "minmax": CalibrationMethod.MinMax,
                "percentile": CalibrationMethod.Percentile,
                "entropy": CalibrationMethod.Entropy,
            }[params["method"]],
            extra_options={"WeightSymmetric": True},
        )


def compile_ort_dynamic(request: dict[str, Any], notes: list[str]) -> None:
    from onnxruntime.quantization import quantize_dynamic

    with tempfile.TemporaryDirectory(prefix="qcompile-bench-ort-") as tmp:
        model = _pre_process(request["model"], Path(tmp) / "pre.onnx", notes)
        quantize_dynamic(model, request["output"])


def compile_nncf(request: dict[str, Any], notes: list[str]) -> None:
    import nncf
    import onnx

    feeds = read_feeds(request["calibration"])
    model_type = request["params"].get("model_type")
    quantized = nncf.quantize(
        onnx.load(request["model"]),
        nncf.Dataset(feeds),
        subset_size=len(feeds),  # all calibration samples, as the other tools get (its default is 300)
        model_type=nncf.ModelType(model_type) if model_type else None,
    )
    onnx.save(quantized, request["output"])


TOOLS = {
    "qcompile": compile_qcompile,
    "ort_static": compile_ort_static,
    "ort_dynamic": compile_ort_dynamic,
    "nncf": compile_nncf,
}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


def _vmhwm_kib() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def main() -> None:
    request = json.loads(Path(sys.argv[1]).read_text())
    notes: list[str] = []
    result: dict[str, Any] = {"ok": False, "notes": notes}
    compile_fn = TOOLS[request["tool"]]
    if request["tool"] == "nncf":
        import nncf  # noqa: F401  (imported before the clock starts, as the other tools' imports are)
    else:
        import onnxruntime.quantization  # noqa: F401

        import qcompile  # noqa: F401
    start = time.perf_counter()
    try:
        compile_fn(request, notes)
        result["ok"] = True
    except Exception as exc:  # a peer that fails is a row with its error, not a crash
        result["error"] = f"{type(exc).__name__}: {_first_line(exc)}"
        traceback.print_exc()
    result["seconds"] = time.perf_counter() - start
    result["vmhwm_kib"] = _vmhwm_kib()
    Path(request["result"]).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
