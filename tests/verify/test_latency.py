import importlib
import numpy as np
import pytest

from qcompile.errors import InvalidDataError, UsageError
from qcompile.verify.latency import measure_latency
from tests.verify.models import feeds, mlp, mlp_ir


def test_latency_of_two_models():
    results = measure_latency({"float": mlp(), "other": mlp_ir()}, feeds(1)[0], warmup=1, runs=7)
    assert list(results) == ["float", "other"]
    for name, r in results.items():
        assert r.name == name
        assert 0 < r.min_ms <= r.median_ms <= r.p90_ms
        assert r.runs == 7 and r.threads == 1 and r.provider == "cpu"
        assert set(r.to_json()) == {"name", "median_ms", "p90_ms", "min_ms", "runs", "threads", "provider"}


def test_latency_argument_errors():
    feed = feeds(1)[0]
    with pytest.raises(UsageError):
        measure_latency({}, feed)
    with pytest.raises(UsageError):
        measure_latency({"m": mlp()}, feed, runs=0)
    with pytest.raises(InvalidDataError, match="'m'"):
        measure_latency({"m": mlp()}, {"x": np.zeros((1, 3), np.float32)}, warmup=0, runs=1)


def test_time_budget_stops_after_min_runs():
    results = measure_latency({"m": mlp()}, feeds(1)[0], warmup=0, runs=1000, time_budget_s=0.0, min_runs=4)
    assert results["m"].runs == 4


def test_rounds_run_in_varying_order(monkeypatch):
    # A fixed order always runs a model right after the same one (after a large float model its
    # caches start cold); every model must follow every other one in some round.
    latency = importlib.import_module("qcompile.verify.latency")

    calls: list[str] = []

    class Recorder:
        def __init__(self, name):
            self.name = name

        def run(self, outputs, feed):
            calls.append(self.name)

    monkeypatch.setattr(latency, "make_session", lambda model, *a, **k: Recorder(model))
    results = measure_latency({"a": "a", "b": "b", "c": "c"}, feeds(1)[0], warmup=0, runs=30)
    assert all(r.runs == 30 for r in results.values())
    rounds = [tuple(calls[i : i + 3]) for i in range(0, len(calls), 3)]
    assert all(sorted(r) == ["a", "b", "c"] for r in rounds)
    predecessors = {(r[i - 1], r[i]) for r in rounds for i in range(1, 3)}
    assert predecessors == {(x, y) for x in "abc" for y in "abc" if x != y}
