"""What keeping a layer in float costs, measured: latency from onnxruntime's profiler, size exactly.

Latency: the float model and the all-int8 model are each run a few times at one thread with
onnxruntime's profiler on, on one sample; every kernel's time is credited to the node it came from
(onnxruntime keeps our node names, adding ``_token_N`` to fused and layout-transformed nodes). The
float model runs at the basic optimization level so that its nodes keep their names. A layer's
latency cost is its float time minus its int8 time (clamped at 0). Size: a float weight takes
4 bytes per value, an int8 one 1 byte (scales are negligible).

The cost the search divides by is relative: Δlatency / int8 latency + Δsize / int8 size.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Collection
from dataclasses import dataclass

import numpy as np
import onnx

from qcompile.verify.sessions import Optimization, make_session

_SUFFIX = re.compile(r"(_token_\d+)+$|_kernel_time$")


@dataclass(frozen=True)
class LayerCost:
    latency_ms: float  # float time - int8 time, from the profiler (>= 0)
    size_bytes: int  # 3 bytes per weight value
    relative: float  # the search's cost: latency share + size share


def _node_times(model: onnx.ModelProto, feed: dict[str, np.ndarray], level: Optimization, runs: int) -> dict[str, float]:
    """Mean ms per run of each node name (fused kernels credited to their named origin)."""
    with tempfile.TemporaryDirectory() as folder:
        session = make_session(
            model, "cpu", intra_op_threads=1, optimization=level, profile_prefix=os.path.join(folder, "profile")
        )
        session.run(None, feed)  # warm-up (its events are averaged in: one run in runs + 1)
        for _ in range(runs):
            session.run(None, feed)
        path = session.end_profiling()
        with open(path) as f:
            events = json.load(f)
    times: dict[str, float] = {}
    runs_seen: dict[str, int] = {}
    for event in events:
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time"):
            continue
        name = _SUFFIX.sub("", _SUFFIX.sub("", event["name"]))
        times[name] = times.get(name, 0.0) + event.get("dur", 0) / 1e3
        runs_seen[name] = runs_seen.get(name, 0) + 1
    # The first run (warm-up) is in the events too: average over all runs seen.
    return {name: t / max(1, runs_seen[name]) for name, t in times.items()}


def measure_costs(
    float_model: onnx.ModelProto,
    int8_model: onnx.ModelProto,
    layers: Collection[str],
    weight_values: dict[str, int],
    feed: dict[str, np.ndarray],
    runs: int = 5,
) -> tuple[dict[str, LayerCost], dict[str, float]]:
    """Per-layer cost of staying float, and the totals it is relative to."""
    float_times = _node_times(float_model, feed, "basic", runs)
    int8_times = _node_times(int8_model, feed, "all", runs)
    int8_total_ms = max(sum(int8_times.values()), 1e-6)
    int8_size = max(int8_model.ByteSize(), 1)
    raw = {}
    for name in layers:
        latency = max(0.0, float_times.get(name, 0.0) - int8_times.get(name, 0.0))
        size = 3 * weight_values.get(name, 0)
        raw[name] = (latency, size, latency / int8_total_ms + size / int8_size)
    # A floor (a quarter of the median layer's cost) keeps a layer the profiler could not credit, or
    # one too small to time, from an unbounded gain per cost.
    floor = max(0.25 * float(np.median([r[2] for r in raw.values()])) if raw else 0.0, 1e-4)
    costs = {name: LayerCost(latency, size, max(relative, floor)) for name, (latency, size, relative) in raw.items()}
    totals = {"int8_ms": int8_total_ms, "float_ms": sum(float_times.values()), "int8_bytes": int8_size}
    return costs, totals
