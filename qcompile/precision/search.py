"""The search: the cheapest per-layer assignment that meets an accuracy budget.

1. The all-int8 model (every searchable layer int8) is evaluated on the search samples; if it meets
   the budget, nothing is promoted.
2. Sensitivity (``sensitivity.py``) ranks layers by the SQNR that keeping each one float buys back;
   cost (``cost.py``) is each layer's measured latency and size of staying float.
3. Greedy promotion: the layer with the largest gain per cost goes float — a promotion that would
   open a new float region is charged extra (``regions.py``), and int8 layers left as islands
   between float layers go float with it — then the real model is built from the cached ranges and
   evaluated. This repeats until the budget holds, each step taking twice as many layers as the
   last (1, 2, 4, ...) so that a budget needing many layers costs a few builds, not one per layer;
   the step that meets it is then bisected back to the shortest prefix of the promotion order that
   still meets it.
4. Demotion sweep: promoted layers, cheapest gain per cost first, return to int8 wherever the
   budget still holds without them (never out of the middle of a float region).
5. The result is checked on held-out samples; if it misses there, the search resumes with the
   held-out samples required too.

A budget no assignment meets is reported with the best point reached. Every evaluated assignment is
a point (budget value, SQNR, size, latency); the Pareto front is drawn from them.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import networkx as nx
import onnx

from qcompile.precision import regions as float_regions
from qcompile.precision.budget import Budget, min_sqnr_db
from qcompile.precision.cost import LayerCost
from qcompile.precision.evaluate import Evaluator
from qcompile.precision.sensitivity import LayerSensitivity

# A promotion that opens a new float region costs this much more (a Q/DQ boundary pair and a kernel switch).
REGION_PENALTY = 0.5
# Gains below this (dB) are within the ranking subset's noise: such layers are tried last.
MIN_GAIN_DB = 0.01


@dataclass
class Point:
    label: str
    float_layers: tuple[str, ...]
    value: float  # the budget's value on the search samples
    ok: bool
    sqnr_db: float
    size_bytes: int
    latency_ms: float | None = None
    held_out_value: float | None = None

    def to_json(self) -> dict:
        return {
            "label": self.label,
            "float_layers": len(self.float_layers),
            "value": _finite(self.value),
            "ok": self.ok,
            "sqnr_db": _finite(self.sqnr_db),
            "size_bytes": self.size_bytes,
            "latency_ms": self.latency_ms,
            "held_out_value": _finite(self.held_out_value),
        }


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), 6)


@dataclass
class SearchResult:
    budget: str
    met: bool
    chosen: Point
    reasons: dict[str, str]  # float layer -> why (its measured gain, or contiguity)
    points: list[Point]
    sensitivities: list[LayerSensitivity]
    costs: dict[str, LayerCost]
    layers: int
    seconds: float
    message: str
    timings: dict[str, float] = field(default_factory=dict)


class Search:
    """One search over ``layers`` (name, op_type); ``build(float_layers)`` gives a candidate model."""

    def __init__(
        self,
        budget: Budget,
        layers: Sequence[tuple[str, str]],
        build: Callable[[frozenset[str]], onnx.ModelProto],
        evaluator: Evaluator,
        held_out: Evaluator | None,
        graph: nx.DiGraph,
        time_limit_s: float = 50.0,
    ) -> None:
        self.budget = budget
        self.layers = [name for name, _ in layers]
        self.build = build
        self.evaluators = [evaluator]
        self.held_out = held_out
        self.graph = graph
        self.time_limit_s = time_limit_s
        self.points: list[Point] = []
        self.timed_out = False  # the greedy phase hit the time limit before meeting the budget
        self._memo: dict[frozenset[str], Point] = {}
        self._start = time.perf_counter()

    def evaluate(self, float_layers: frozenset[str], label: str) -> Point:
        """Build and run the real model; ``ok`` when every active evaluator meets the budget."""
        if float_layers in self._memo and len(self.evaluators) == 1:
            return self._memo[float_layers]
        model = self.build(float_layers)
        main = self.evaluators[0]
        outputs = main.run(model)
        value, ok = self.budget.evaluate(main.reference, outputs)
        held_value = None
        for extra in self.evaluators[1:]:
            extra_value, extra_ok = self.budget.evaluate(extra.reference, extra.run(model))
            ok = ok and extra_ok
            held_value = extra_value if extra is self.held_out else held_value
        point = Point(label, tuple(sorted(float_layers)), value, ok, min_sqnr_db(main.reference, outputs), model.ByteSize())
        point.held_out_value = held_value
        self.points.append(point)
        self._memo[float_layers] = point
        return point

    def _better(self, a: Point, b: Point) -> bool:
        return a.value > b.value if self.budget.higher_is_better else a.value < b.value

    def run(self, sensitivities: Sequence[LayerSensitivity], costs: dict[str, LayerCost]) -> tuple[Point, dict[str, str], bool]:
        gain = {s.name: s.gain_db for s in sensitivities}
        reasons: dict[str, str] = {}
        current = self.evaluate(frozenset(), "all int8")
        best = current
        float_set: set[str] = set()
        for attempt in range(2):  # the second round only when the held-out check fails
            step = 1
            order: list[str] = []  # promotions in the order taken (islands right after their cause)
            last_short = len(float_set)
            while not current.ok:
                if time.perf_counter() - self._start > self.time_limit_s:
                    self.timed_out = True
                    break
                picks = []
                last_short = len(order)
                for _ in range(step):
                    pick = self._next(float_set, gain, costs)
                    if pick is None:
                        break
                    picks.append(pick)
                    float_set.add(pick)
                    order.append(pick)
                    reasons[pick] = f"kept float by the precision search: {gain.get(pick, 0.0):+.2f} dB"
                    for island in float_regions.islands(self.graph, float_set):
                        float_set.add(island)
                        order.append(island)
                        reasons[island] = "kept float by the precision search: between float layers (one contiguous region)"
                if not picks:
                    break
                current = self.evaluate(frozenset(float_set), f"{len(float_set)} float")
                if self._better(current, best) or current.ok:
                    best = current
                # Still short: take larger steps (bisection below gives back what was overshot).
                step *= 2
            if current.ok and len(order) - last_short > 1:
                current = self._bisect(order, last_short, float_set, current)
            if not current.ok:
                break
            before_demotion = set(float_set)
            current = self._demote(float_set, gain, costs, reasons, current)
            if self.held_out is None or attempt == 1:
                break
            value, ok = self.budget.evaluate(self.held_out.reference, self.held_out.run(self.build(frozenset(float_set))))
            current.held_out_value = value
            if ok:
                break
            # Missed on held-out samples: require them too. The demotion sweep went to the edge of the
            # search samples; the set before it had margin, so it is tried first, then promotion resumes.
            self.evaluators.append(self.held_out)
            if before_demotion != float_set:
                float_set.clear()
                float_set.update(before_demotion)
            current = self.evaluate(frozenset(float_set), f"{len(float_set)} float (held-out required)")
        met = current.ok
        chosen = current if met else best
        chosen_reasons = {name: reasons.get(name, "kept float by the precision search") for name in chosen.float_layers}
        return chosen, chosen_reasons, met

    def _next(self, float_set: set[str], gain: dict[str, float], costs: dict[str, LayerCost]) -> str | None:
        left = [name for name in self.layers if name not in float_set]
        if not left:
            return None
        # Layers measured to help first; the rest (gain <= 0 alone) only once those are used up.
        helpful = [name for name in left if gain.get(name, 0.0) > MIN_GAIN_DB] or left
        before = float_regions.regions(self.graph, float_set)

        def score(name: str) -> float:
            new_regions = float_regions.regions(self.graph, float_set | {name}) - before
            cost = costs[name].relative if name in costs else 1.0
            return max(gain.get(name, 0.0), 1e-3) / (cost * (1.0 + REGION_PENALTY * max(0, new_regions)))

        return max(helpful, key=score)

    def _bisect(self, order: list[str], short: int, float_set: set[str], met: Point) -> Point:
        """The shortest prefix of the promotion order that still meets the budget (binary search)."""
        lo, hi, best = short, len(order), met
        while hi - lo > 1 and time.perf_counter() - self._start <= self.time_limit_s:
            mid = (lo + hi) // 2
            point = self.evaluate(frozenset(order[:mid]), f"{mid} float (bisecting)")
            if point.ok:
                hi, best = mid, point
            else:
                lo = mid
        float_set.intersection_update(order[:hi])
        return best

    def _demote(self, float_set, gain, costs, reasons, current: Point) -> Point:
        """Return promoted layers to int8 while the budget holds, least gain per cost first."""
        def worth(name: str) -> float:
            return gain.get(name, 0.0) / (costs[name].relative if name in costs else 1.0)

        for name in sorted(float_set, key=worth):
            if time.perf_counter() - self._start > self.time_limit_s:
                break
            trial = float_set - {name}
            if float_regions.regions(self.graph, trial) > float_regions.regions(self.graph, float_set):
                continue  # would split a float region in two
            point = self.evaluate(frozenset(trial), f"{len(trial)} float (demoted {name})")
            if point.ok:
                float_set.discard(name)
                reasons.pop(name, None)
                current = point
        return current


def pareto_front(points: Sequence[Point], higher_is_better: bool) -> list[Point]:
    """Points no other point beats on error, size and latency at once (latency where measured)."""
    def key(p: Point) -> tuple[float, float, float]:
        error = -p.value if higher_is_better else p.value
        return (error, p.size_bytes, p.latency_ms if p.latency_ms is not None else math.inf)

    unique = {p.float_layers: p for p in points}.values()
    front = []
    for p in unique:
        kp = key(p)
        dominated = any(
            all(a <= b for a, b in zip(key(q), kp)) and any(a < b for a, b in zip(key(q), kp)) for q in unique if q is not p
        )
        if not dominated:
            front.append(p)
    return sorted(front, key=lambda p: (p.size_bytes, key(p)[0]))
