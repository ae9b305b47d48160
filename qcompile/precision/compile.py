"""The mixed-precision compile: one calibration, the budgeted search (or a recipe), the final model.

Called by ``qcompile.api.compile_model`` when a budget or a recipe is given, in place of
``pipeline.compile_ir``; returns the same (model, calibration summary) plus the precision report.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir

from qcompile import __version__
from qcompile.errors import UsageError
from qcompile.options import Target
from qcompile.pipeline import (
    CalibrationSummary,
    PassRunner,
    annotate_stage,
    calibration_stage,
    cleanup_passes,
    precision_policy,
    smoothing_stage,
)
from qcompile.precision import recipe as recipes
from qcompile.precision import sensitivity as sens
from qcompile.precision.budget import Budget, min_sqnr_db, parse_budget
from qcompile.precision.cost import measure_costs
from qcompile.precision.evaluate import Evaluator, pack, split_samples
from qcompile.precision.plot import front_html, front_table
from qcompile.precision.policy import SEARCHED_OPS, Assignment, Precision, PrecisionPolicy
from qcompile.precision.ranges import annotated_activations, build_candidate, observe_every_activation, ranges_by_tensor
from qcompile.precision.regions import layer_graph
from qcompile.precision.search import Point, Search, SearchResult, pareto_front
from qcompile.quant.spec import DECISION_KEY
from qcompile.verify.latency import measure_latency

# Samples the budget is checked on (calibration data), held-out samples the result is verified on,
# and the ranking subset sensitivity runs on.
SEARCH_SAMPLES = 128
HELD_OUT_SAMPLES = 128
RANKING_SAMPLES = 16
# Candidate models timed for the Pareto front (latency is the slowest measurement).
TIMED_POINTS = 5


@dataclass
class MixedOutcome:
    model: ir.Model
    summary: CalibrationSummary
    report: dict
    recipe: recipes.Recipe
    html: str | None = None
    unmet: str | None = None  # the budget was not met: why, with the best point


def _policy(base: PrecisionPolicy, float_layers: Iterable[str], reasons: dict[str, str] | None = None) -> PrecisionPolicy:
    reasons = reasons or {}
    auto = {name: Assignment(Precision.FP32, reasons.get(name, "by the precision search")) for name in float_layers}
    return base.with_auto(auto)


def _assignment(model: ir.Model, policy: PrecisionPolicy) -> dict[str, Assignment]:
    return {name: a for name, a in policy.resolve_graph(model.graph).items() if a.precision != policy.default}


def _weight_values(model: ir.Model, layers: Sequence[str]) -> dict[str, int]:
    by_name = {n.name: n for n in model.graph}
    out = {}
    for name in layers:
        node = by_name[name]
        weight = node.inputs[1] if len(node.inputs) > 1 else None
        out[name] = int(np.prod(weight.shape.numpy())) if weight is not None and weight.const_value is not None and weight.shape else 0
    return out


def _samples(feeds: Iterable[dict[str, np.ndarray]], n: int) -> list[dict[str, np.ndarray]]:
    out: list[dict[str, np.ndarray]] = []
    for feed in feeds:
        out += split_samples([feed])
        if len(out) >= n:
            break
    return out[:n]


def compile_mixed(
    model: ir.Model,
    calibration_feeds,
    total: int | None,
    runner: PassRunner,
    *,
    verify_feeds=None,
    budget: Budget | None = None,
) -> MixedOutcome:
    options = runner.options
    if options.calibration.bias_correction_batches:
        raise UsageError("bias correction is not combined with --budget/--recipe yet; drop --bias-correction-batches")
    if options.target != Target.CPU:
        raise UsageError(f"--budget/--recipe: the precision search supports --target cpu only, not {options.target.value}")
    model = runner.run(model, cleanup_passes(options))
    if options.smooth_quant.enabled:
        # SmoothQuant is a float-to-float rewrite: the search and every candidate start from the
        # smoothed float model (its Muls carry their float decision in node metadata).
        policy = precision_policy(options)
        model = smoothing_stage(annotate_stage(model, runner, policy), calibration_feeds, total, runner, policy)
    cleaned = ir.to_proto(model)
    if options.precision.recipe is not None:
        return _replay(model, cleaned, calibration_feeds, runner)
    budget = budget or parse_budget(options.precision.budget)
    return _search(model, cleaned, calibration_feeds, total, runner, verify_feeds, budget)


def _replay(model: ir.Model, cleaned: onnx.ModelProto, feeds, runner: PassRunner) -> MixedOutcome:
    options = runner.options
    path = options.precision.recipe
    recipe = recipes.load(path)
    start = time.perf_counter()
    # The data is read once per compile for its fingerprint: SmoothQuant's cache key shares it.
    fingerprint, count = runner.data_fingerprint(feeds)
    recipes.check(recipe, path, version=__version__, model=recipes.model_fingerprint(cleaned), calibration=fingerprint, options=options)
    summary = CalibrationSummary(count, 0, time.perf_counter() - start, fingerprint, len(recipe.ranges), 0)
    runner.record("calibrate", summary.seconds, model, [f"calibration: ranges from recipe {path} (no calibration run)"])
    policy = PrecisionPolicy(auto=recipe.assignment)
    candidate = build_candidate(cleaned, recipe.ranges, policy, options, runner)
    report = {"mode": "recipe", "recipe": str(path), "layers": len(recipe.assignment), **recipe.summary}
    return MixedOutcome(candidate.model, summary, report, recipe)


def _search(model, cleaned, feeds, total, runner, verify_feeds, budget: Budget) -> MixedOutcome:
    options = runner.options
    start = time.perf_counter()
    base = precision_policy(options)
    annotated = annotate_stage(model, runner, base)
    activations = annotated_activations(annotated)
    if activations:
        observe_every_activation(annotated, activations[0][1].spec)
    group_qparams, summary = calibration_stage(annotated, feeds, total, runner)
    tensor_ranges = ranges_by_tensor(annotated, group_qparams)
    timings = {"calibrate": time.perf_counter() - start}

    def build(float_layers: frozenset[str]) -> onnx.ModelProto:
        return build_candidate(cleaned, tensor_ranges, _policy(base, float_layers), options).proto

    int8 = build_candidate(cleaned, tensor_ranges, base, options)
    layers = [
        (node.name, node.op_type)
        # From the annotated float graph: later passes may rewrite a layer (run-time quantization
        # turns a MatMul into MatMulInteger), its decision is made here.
        for node in annotated.graph
        if node.op_type in SEARCHED_OPS and (d := node.meta.get(DECISION_KEY)) is not None and d.quantized and base.explicit(node) is None
    ]
    names = [name for name, _ in layers]
    samples = _samples(feeds, SEARCH_SAMPLES)
    evaluator = Evaluator(cleaned, pack(cleaned, samples))
    held = _samples(verify_feeds, HELD_OUT_SAMPLES) if verify_feeds is not None else []
    held_out = Evaluator(cleaned, pack(cleaned, held)) if held else None

    # Sensitivity on the ranking subset (cached beside the calibration cache).
    t = time.perf_counter()
    single = Evaluator(cleaned, samples)
    int8_single = single.run(int8.proto)
    ranking = [samples[i] for i in sens.ranking_subset(samples, single.reference, int8_single, RANKING_SAMPLES)]
    del single, int8_single
    ranker = Evaluator(cleaned, pack(cleaned, ranking))
    int8_sqnr = min_sqnr_db(ranker.reference, ranker.run(int8.proto))
    cache = sens.cache_path(options.calibration.cache)
    rule_texts = [f"{r.source}:{r.text}" for r in base.rules]
    key = sens.cache_key(summary.fingerprint + recipes.model_fingerprint(cleaned) + str(recipes.settings(options)), rule_texts, ranking)
    sensitivities = sens.read_cached(cache, key)
    cached = sensitivities is not None
    if sensitivities is None:
        sensitivities = sens.measure(layers, int8.proto, cleaned, ranker, int8_sqnr, build)
        sens.write_cached(cache, key, sensitivities)
    timings["sensitivity"] = time.perf_counter() - t

    t = time.perf_counter()
    costs, cost_totals = measure_costs(cleaned, int8.proto, names, _weight_values(ir.from_proto(cleaned), names), samples[0])
    timings["cost"] = time.perf_counter() - t

    t = time.perf_counter()
    search = Search(budget, layers, build, evaluator, held_out, layer_graph(annotated, names))
    chosen, reasons, met = search.run(sensitivities, costs)
    timings["search"] = time.perf_counter() - t

    # Latency of the front's points (and the float model), timed interleaved at one thread.
    t = time.perf_counter()
    front = pareto_front(search.points, budget.higher_is_better)
    timed = front if len(front) <= TIMED_POINTS else [front[round(i * (len(front) - 1) / (TIMED_POINTS - 1))] for i in range(TIMED_POINTS)]
    if chosen not in timed:
        timed.append(chosen)
    models = {f"p{i}": build(frozenset(p.float_layers)) for i, p in enumerate(timed)}
    models["float"] = cleaned
    latency = measure_latency(models, samples[0], threads=1, warmup=2, runs=8)
    for i, p in enumerate(timed):
        p.latency_ms = round(latency[f"p{i}"].median_ms, 4)
    float_ms = latency["float"].median_ms
    float_outputs = evaluator.reference
    float_value, _ = budget.evaluate(float_outputs, float_outputs)
    float_point = Point("float model", tuple(names), float_value, True, math.inf, cleaned.ByteSize(), round(float_ms, 4))
    timings["latency"] = time.perf_counter() - t

    policy = _policy(base, chosen.float_layers, reasons)
    final = build_candidate(cleaned, tensor_ranges, policy, options, runner)
    result = SearchResult(
        budget=budget.text, met=met, chosen=chosen, reasons=reasons, points=search.points, sensitivities=sensitivities,
        costs=costs, layers=len(layers), seconds=time.perf_counter() - start, message="", timings=timings,
    )
    searched_front = ([p for p in front if p.latency_ms is not None] or front) + [float_point]
    unmet = None
    if not met:
        why = f"stopped at the {search.time_limit_s:.0f} s search limit" if search.timed_out else "cannot be met by any assignment tried"
        unmet = (
            f"budget {budget.text} {why} ({len(search.points)} models, "
            f"{len(chosen.float_layers)} of {len(layers)} layers float at best): best reachable {chosen.value:.6g}"
        )
    report = _report(result, searched_front, cached, float_ms, cleaned.ByteSize(), cost_totals, unmet)
    recipe = recipes.Recipe(
        version=__version__,
        model=recipes.model_fingerprint(cleaned),
        calibration=summary.fingerprint,
        settings=recipes.settings(options),
        assignment=_assignment(final.model, policy),
        ranges=tensor_ranges,
        summary={"budget": budget.text, "met": met, "value": chosen.value, "float_layers": len(chosen.float_layers)},
    )
    html = front_html(searched_front, budget.text, chosen, f"qcompile precision search: {budget.text}")
    return MixedOutcome(final.model, summary, report, recipe, html, unmet)


def _report(result: SearchResult, front, cached: bool, float_ms: float, float_bytes: int, cost_totals, unmet) -> dict:
    gain = {s.name: s for s in result.sensitivities}
    promoted = [
        {
            "name": name,
            "op_type": gain[name].op_type if name in gain else "",
            "gain_db": round(gain[name].gain_db, 3) if name in gain else None,
            "latency_cost_ms": round(result.costs[name].latency_ms, 4) if name in result.costs else None,
            "size_cost_bytes": result.costs[name].size_bytes if name in result.costs else None,
            "reason": result.reasons.get(name, ""),
        }
        for name in result.chosen.float_layers
    ]
    return {
        "mode": "search",
        "budget": result.budget,
        "met": result.met,
        "unmet": unmet,
        "layers": result.layers,
        "promoted": promoted,
        "chosen": result.chosen.to_json(),
        "float_latency_ms": round(float_ms, 4),
        "float_bytes": float_bytes,
        "profiled": {k: round(v, 4) for k, v in cost_totals.items()},
        "models_evaluated": len(result.points),
        "cost_model": "latency from onnxruntime's profiler (float at basic level vs int8 at all, 1 thread) + exact weight bytes",
        "sensitivity_cached": cached,
        "sensitivity": [
            {"name": s.name, "op_type": s.op_type, "gain_db": round(s.gain_db, 3)} for s in result.sensitivities[:10]
        ],
        "pareto_front": [p.to_json() for p in front],
        "pareto_table": front_table(front, result.budget, result.chosen),
        "seconds": round(result.seconds, 2),
        "timings": {k: round(v, 2) for k, v in result.timings.items()},
    }


def as_budget(budget) -> Budget | None:
    """A Budget from the API's ``budget`` argument: a Budget, budget text, or a callable."""
    if budget is None or isinstance(budget, Budget):
        return budget
    if isinstance(budget, str):
        return parse_budget(budget)
    if callable(budget):
        return Budget.from_callable(budget)
    raise UsageError(f"budget must be a Budget, budget text or a callable, got {type(budget).__name__}")
