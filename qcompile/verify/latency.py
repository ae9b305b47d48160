"""Latency of several models measured side by side, for reports and benchmarks.

The machines are shared and noisy, so a latency means something only as a ratio to another model
timed in the same loop (``MEASURING.md``). Every session is built first and warmed up, then the
models are timed interleaved — run 1 of each, run 2 of each, ... (in a new seeded order each round,
so that no model always runs right after the same one) — so that a burst of noise falls on all of
them alike. Sessions come from ``make_session``, which turns intra-op spinning off.
No test asserts a timing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

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
    models: dict[str, onnx.ModelProto | ir.Model | ort.InferenceSession],
    feed: dict[str, np.ndarray],
    *,
    threads: int = 1,
    warmup: int = 5,
    runs: int = 50,
    provider: Provider = "cpu",
    optimization: Optimization = "all",
    time_budget_s: float | None = None,
    min_runs: int = 3,
) -> dict[str, LatencyResult]:
    """Median and 90th-percentile latency in ms of each model on ``feed``, timed interleaved.

    ``threads`` is the intra-op thread count of every session (inter-op is 1); a model given as a
    session is used as it is (it was made with ``make_session``). With
    ``time_budget_s``, rounds stop once the timed rounds took that long and at least ``min_runs``
    ran (each result says how many ran).
    """
    if not models:
        raise UsageError("measure_latency needs at least one model")
    if runs < 1:
        raise UsageError(f"runs must be at least 1, got {runs}")
    if warmup < 0:
        raise UsageError(f"warmup must be at least 0, got {warmup}")

    # All sessions exist before any timing starts: building one must not disturb another's runs.
    sessions = {
        name: model if isinstance(model, ort.InferenceSession)
        else make_session(model, provider, intra_op_threads=threads, optimization=optimization)
        for name, model in models.items()
    }
    times: dict[str, list[float]] = {name: [] for name in sessions}
    current = ""
    try:
        for current, sess in sessions.items():
            for _ in range(warmup):
                sess.run(None, feed)
        started = time.perf_counter()
        names = list(sessions)
        order = np.random.default_rng(0)  # seeded: the same rounds for the same models
        for done in range(runs):
            if time_budget_s is not None and done >= min_runs and time.perf_counter() - started > time_budget_s:
                break
            # A new order each round: a model run right after a large one starts with its caches
            # evicted (MiniLM's 86 MiB float weights), measured 2-4% slower than the same model
            # elsewhere in a fixed order. Shuffling gives every model every predecessor alike.
            for current in order.permutation(names):
                sess = sessions[current]
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
            runs=len(samples),
            threads=threads,
            provider=provider,
        )
    return results


# Batch sizes and time per batch size of the compile report's latency (a few seconds in all).
REPORT_BATCHES = (1, 8)
LATENCY_BUDGET_S = 1.0
REPORT_THREADS = 1


def batched_feed(sample: dict[str, np.ndarray], fixed: dict[str, int | None], batch: int) -> dict[str, np.ndarray] | str:
    """``sample``'s first item repeated ``batch`` times along axis 0, or why that cannot be fed.

    ``fixed``: each input's static batch dimension (None: symbolic). A rank-0 input is fed as is.
    """
    feed = {}
    for name, array in sample.items():
        array = np.asarray(array)
        if array.ndim == 0:
            feed[name] = array
            continue
        static = fixed.get(name)
        if static is not None and static != batch:
            return f"input {name!r} has a fixed batch dimension of {static}"
        feed[name] = np.ascontiguousarray(np.repeat(array[:1], batch, axis=0))
    return feed


def report_latency(
    float_model: onnx.ModelProto,
    compiled_model: onnx.ModelProto,
    sample: dict[str, np.ndarray],
    fixed: dict[str, int | None],
    *,
    provider: Provider = "cpu",
    batches: tuple[int, ...] = REPORT_BATCHES,
    threads: int = REPORT_THREADS,
    time_budget_s: float = LATENCY_BUDGET_S,
) -> dict[str, Any]:
    """Float vs compiled latency for the compile report: per batch size, interleaved medians and the ratio."""
    rows = []
    # One session per model for every batch size (the batch dimension is symbolic where it varies).
    sessions = {
        "float": make_session(float_model, provider, intra_op_threads=threads),
        "compiled": make_session(compiled_model, provider, intra_op_threads=threads),
    }
    for batch in batches:
        feed = batched_feed(sample, fixed, batch)
        if isinstance(feed, str):
            rows.append({"batch": batch, "skipped": feed})
            continue
        results = measure_latency(
            sessions, feed, threads=threads, warmup=2,
            runs=50, provider=provider, time_budget_s=time_budget_s,
        )
        f, c = results["float"], results["compiled"]
        rows.append({
            "batch": batch,
            "float_median_ms": round(f.median_ms, 4),
            "compiled_median_ms": round(c.median_ms, 4),
            "speedup": round(f.median_ms / c.median_ms, 3) if c.median_ms > 0 else None,
            "runs": f.runs,
        })
    return {"provider": provider, "threads": threads, "spinning": False, "batches": rows}
