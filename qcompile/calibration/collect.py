"""Run calibration: stream every feed through the observation model into the observers.

The observation model is the float model with every tensor to calibrate made a graph output
(``passes/insert_observers``). For each feed, onnxruntime (CPU) computes only the outputs that
have an observer; each array goes into its observer and is dropped before the next feed, so
memory holds one batch of activations at a time.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
from tqdm import tqdm

from qcompile.calibration.observers import Observer
from qcompile.errors import InternalError, InvalidDataError, InvalidModelError


@dataclass(frozen=True)
class CalibrationStats:
    feeds: int
    samples: int  # sum over feeds of the first model input's batch dimension
    seconds: float


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 4
    # BASIC keeps every graph output (the observed tensors) while folding constants.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    try:
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types, none shared
        raise InvalidModelError(f"onnxruntime cannot load the model for calibration: {_first_line(exc)}") from None


def calibrate(
    observation_model: onnx.ModelProto,
    feeds: Iterable[Mapping[str, np.ndarray]],
    observers: Mapping[str, Observer],
    *,
    show_progress: bool = True,
    total: int | None = None,
) -> CalibrationStats:
    """Feed every batch to onnxruntime and stream each observed tensor into ``observers[name]``.

    Several names may map to one observer (tensors that share qparams). ``total`` sizes the
    progress bar (default: ``len(feeds)`` when it has one). Errors: no feeds, or onnxruntime
    failing on a feed → InvalidDataError naming the feed (counted from 0).
    """
    session = _session(observation_model)
    outputs = {o.name for o in session.get_outputs()}
    names = list(observers)
    missing = [n for n in names if n not in outputs]
    if missing:
        raise InternalError(f"tensors {missing} are not outputs of the observation model")
    first_input = session.get_inputs()[0].name if session.get_inputs() else None
    if total is None and hasattr(feeds, "__len__"):
        total = len(feeds)  # type: ignore[arg-type]

    start = time.perf_counter()
    count = samples = 0
    # disable=None: tqdm shows the bar only when stderr is a terminal (not in logs or CI).
    disable = None if show_progress else True
    with tqdm(feeds, total=total, disable=disable, file=sys.stderr, desc="calibrating", unit="feed") as bar:
        for index, feed in enumerate(bar):
            try:
                arrays = session.run(names, dict(feed))
            except Exception as exc:  # onnxruntime's Fail / InvalidArgument / RuntimeException
                raise InvalidDataError(f"onnxruntime failed on calibration feed {index}: {_first_line(exc)}") from None
            try:
                for name, array in zip(names, arrays):
                    observers[name].update(array)
            except InvalidDataError as exc:  # NaN/Inf computed by the model: say which feed
                raise InvalidDataError(f"calibration feed {index}: {exc}") from None
            del arrays  # keep no activations past this batch
            count += 1
            if first_input is not None and first_input in feed:
                batch = feed[first_input]
                samples += int(batch.shape[0]) if np.ndim(batch) else 1
    if count == 0:
        raise InvalidDataError("no calibration data: the calibration source yielded no feeds")
    return CalibrationStats(feeds=count, samples=samples, seconds=time.perf_counter() - start)
