"""Latency of several models measured side by side, for reports and benchmarks.

The machines are shared and noisy, so a latency means something only as a ratio to another model
timed in the same loop (``MEASURING.md``). Every session is built first and warmed up, then the
models are timed interleaved — run 1 of each, run 2 of each, ... — so that a burst of noise falls on
all of them alike. Sessions come from ``make_session``, which turns intra-op spinning off.
No test asserts a timing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from qcompile.errors import InvalidDataError, UsageError
from qcompile.verify.sessions import Optimization, Provider, make_session


@dataclass(frozen=True)
class LatencyResult:
    name: str
    median_ms: float
    p90_ms: float
    min_ms: float
    runs: int
    threads: int
    provider: str

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "median_ms": self.median_ms,
            "p90_ms": self.p90_ms,
            "min_ms": self.min_ms,
            "runs": self.runs,
            "threads": self.threads,
            "provider": self.provider,
        }


def measure_latency(
    models: dict[str, onnx.ModelProto | ir.Model],
    feed: dict[str, np.ndarray],
    *,
    threads: int = 1,
    warmup: int = 5,
    runs: int = 50,
    provider: Provider = "cpu",
    optimization: Optimization = "all",
) -> dict[str, LatencyResult]:
    """Median and 90th-percentile latency in ms of each model on ``feed``, timed interleaved.

    ``threads`` is the intra-op thread count of every session (inter-op is 1).
    """
    if not models:
        raise UsageError("measure_latency needs at least one model")
    if runs < 1:
        raise UsageError(f"runs must be at least 1, got {runs}")
    if warmup < 0:
        raise UsageError(f"warmup must be at least 0, got {warmup}")

    # All sessions exist before any timing starts: building one must not disturb another's runs.
    sessions = {
        name: make_session(model, provider, intra_op_threads=threads, optimization=optimization)
        for name, model in models.items()
    }
    times: dict[str, list[float]] = {name: [] for name in sessions}
    current = ""
    try:
        for current, sess in sessions.items():
            for _ in range(warmup):
                sess.run(None, feed)
        for _ in range(runs):
            for current, sess in sessions.items():
                start = time.perf_counter()
                sess.run(None, feed)
                times[current].append((time.perf_counter() - start) * 1e3)
    except Exception as exc:  # onnxruntime's pybind errors derive from Exception only
        raise InvalidDataError(f"model {current!r} cannot run on the latency feed: {exc}") from None

    results = {}
    for name, samples in times.items():
        ms = np.asarray(samples)
        results[name] = LatencyResult(
            name=name,
            median_ms=float(np.median(ms)),
            p90_ms=float(np.percentile(ms, 90)),
            min_ms=float(np.min(ms)),
            runs=runs,
            threads=threads,
            provider=provider,
        )
    return results
