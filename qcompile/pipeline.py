"""The compile pipeline: ordered, named pass lists and the loop that runs them.

Every pass has a stable name used in logs, per-pass timing, IR dumps (``dump_ir_after``) and the
report. Ordering constraints are stated beside each entry.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxscript.optimizer import _constant_folding

from qcompile.calibration import cache as calibration_cache
from qcompile.calibration.channel_stats import collect_channel_stats
from qcompile.calibration.collect import calibrate
from qcompile.calibration.observers import make_observer
from qcompile.data import fingerprint_feeds
from qcompile.graph.notes import notes
from qcompile.graph.queries import node_count
from qcompile.options import CalibrationMethod, CalibrationOptions, CompileOptions, WeightRounding
from qcompile.passes import (
    AnnotatePass,
    AnnotateRangesPass,
    AssignQParamsPass,
    ClearIntermediateShapesPass,
    ConvertFloat16Pass,
    CorrectBiasPass,
    DecomposeBatchNormPass,
    DeriveBiasPass,
    EliminateIdentityPass,
    EqualizeCrossLayerPass,
    FoldBatchNormPass,
    FoldMatMulScalePass,
    FoldSmoothingMulPass,
    FuseSiblingMatMulsPass,
    InsertObserversPass,
    PlaceQDQPass,
    QuantizeDynamicMatMulPass,
    ReduceMeanToGlobalPoolPass,
    RemoveDropoutPass,
    RoundWeightsPass,
    SmoothQuantPass,
)
from qcompile.passes.annotate_ranges import max_abs_from_qparams
from qcompile.passes.insert_observers import activation_groups, group_specs, range_method_overrides
from qcompile.passes.round_weights import MAX_BATCHES as ROUNDING_BATCHES
from qcompile.passes.smooth_quant import find_groups
from qcompile.precision.int4 import int4_weights_pass
from qcompile.precision.policy import PrecisionPolicy, rules_from_options
from qcompile.quant.qparams import QParams
from qcompile.report.model import PassRecord
from qcompile.targets import Precision, TargetProfile, profile_for

Feed = dict[str, np.ndarray]


def cleanup_passes(options: CompileOptions | None = None) -> list[tuple[str, ir.passes.PassBase]]:
    """Float-to-float clean-ups run before anything is quantized."""
    equalize = options is not None and options.calibration.equalize_cross_layer
    return [
        # Every node gets a unique name: reports, --keep-float patterns and the fusion check (which
        # finds our nodes in onnxruntime's optimized graph) refer to nodes by name.
        ("name_nodes", common_passes.NameFixPass()),
        # A Dropout between Conv and BatchNormalization would block the BN fold.
        ("remove_dropout", RemoveDropoutPass()),
        # Weights computed by constant subgraphs (Cast, Reshape of initializers) become initializers,
        # which BN folding and weight quantization need. onnxscript's folder, on onnx-ir.
        (
            "fold_constants",
            _constant_folding.FoldConstantsPass(
                shape_inference=False,
                input_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
                output_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT,
            ),
        ),
        # Constant nodes become initializers: one form for every constant the passes read, and
        # no "Constant stayed float" rows in the report.
        ("lift_constants", common_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)),
        # BN folding/decomposition and the pooling rewrite need ranks.
        ("infer_shapes", common_passes.ShapeInferencePass(strict_mode=False)),
        ("fold_batchnorm", FoldBatchNormPass()),
        # After folding: only BatchNormalization nodes with no foldable producer are left.
        ("decompose_batchnorm", DecomposeBatchNormPass()),
        ("reduce_mean_to_pool", ReduceMeanToGlobalPoolPass()),
        ("eliminate_identity", EliminateIdentityPass()),  # onnx-ir's, keeping Identity between two outputs
        ("remove_unused", common_passes.RemoveUnusedNodesPass()),
        # After BN folding and Identity removal, which would otherwise sit between the layers.
        *([("equalize_cross_layer", EqualizeCrossLayerPass())] if equalize else []),
        # Annotation needs dtypes of the values the rewrites created, and a topological order.
        ("infer_shapes_after_cleanup", common_passes.ShapeInferencePass(strict_mode=False)),
        ("sort", common_passes.TopologicalSortPass()),
    ]


def finalize_passes(
    activation_qparams: dict[str, QParams],
    options: CompileOptions,
    rounding_feeds: Sequence[Feed] = (),
    int4_nodes: tuple[str, ...] = (),
) -> list[tuple[str, ir.passes.PassBase]]:
    """After calibration: numbers, then Q/DQ nodes."""
    optimized = options.calibration.weight_rounding == WeightRounding.OPTIMIZED
    passes = [
        ("assign_qparams", AssignQParamsPass(activation_qparams, options.calibration.weight_method)),
        # Before placement: an overflowing bias raises its weight's scale, and placement rounds
        # the weights with the final scales.
        ("derive_bias", DeriveBiasPass()),
        # After derive_bias (final weight scales), before placement (which stores the integers).
        *([("round_weights", RoundWeightsPass(rounding_feeds, options.calibration.seed))] if optimized else []),
        ("place_qdq", PlaceQDQPass()),
        # After placement (it rewrites the placed Q → DQ → MatMul), before remove_unused (which
        # drops the static Q/DQ pairs it leaves unread).
        *([("quantize_dynamic_matmul", QuantizeDynamicMatMulPass())] if options.scheme.dynamic_matmul else []),
    ]
    if profile_for(options.target).session_provider == "cpu":
        # After placement and the dynamic rewrite: a constant Mul goes into the scale they emit. Before
        # sibling fusion: a q scaled before q·kᵀ then shares its siblings' QuantizeLinear. For
        # onnxruntime's CPU kernels only: it gives a DequantizeLinear another scale than its
        # QuantizeLinear, which explicit-quantization runtimes (TensorRT) pair up.
        passes.append(("fold_matmul_scale", FoldMatMulScalePass()))
    if options.scheme.dynamic_matmul and options.scheme.fuse_sibling_matmuls:
        passes.append(("fuse_sibling_matmuls", FuseSiblingMatMulsPass()))
    if int4_nodes:
        # After placement, on the MatMuls annotation kept float for their int4 weights.
        passes.append(("quantize_int4_weights", int4_weights_pass(int4_nodes, options.output.max_opset)))
    passes += [
        ("remove_unused_after_qdq", common_passes.RemoveUnusedNodesPass()),
        ("sort_after_qdq", common_passes.TopologicalSortPass()),
    ]
    return passes + _strip_metadata(options)


def fp16_passes(max_abs: dict[str, float], profile: TargetProfile, options: CompileOptions) -> list[tuple[str, ir.passes.PassBase]]:
    """After range calibration (fp16 targets): float parts to fp16, fp32 where they would overflow."""
    convert = ConvertFloat16Pass(max_abs, profile.keep_fp32_ops, profile.fp16_overflow_limit, options.scheme.keep_float)
    passes = [
        ("convert_fp16", convert),
        ("remove_unused_after_fp16", common_passes.RemoveUnusedNodesPass()),
        # Casts are inserted after their producers; the order is made whole again.
        ("sort_after_fp16", common_passes.TopologicalSortPass()),
    ]
    return passes + _strip_metadata(options)


def _strip_metadata(options: CompileOptions) -> list[tuple[str, ir.passes.PassBase]]:
    if options.output.keep_node_metadata:
        return []
    # Exporters attach stack traces and module paths to every node (a third of a small
    # model's file); a deployment artifact does not need them. Model metadata is kept.
    return [("strip_node_metadata", common_passes.ClearMetadataAndDocStringPass())]


class PassRunner:
    """Runs named passes in order, timing each and collecting its notes."""

    def __init__(self, options: CompileOptions, log: Callable[[str], None] | None = None) -> None:
        self.options = options
        self.records: list[PassRecord] = []
        self._log = log
        self._fingerprints: list[tuple[object, tuple[str, int]]] = []

    def data_fingerprint(self, feeds: Iterable[dict[str, np.ndarray]]) -> tuple[str, int]:
        """SHA-256 of ``feeds`` (``data.fingerprint_feeds``) and their count: one pass over the data
        (read, not run) the first time, remembered for the rest of the compile (the cache keys of
        SmoothQuant and calibration, and a recipe's check, all need it)."""
        for seen, fingerprint in self._fingerprints:
            if seen is feeds:
                return fingerprint
        digest = hashlib.sha256()
        count = sum(1 for _ in fingerprint_feeds(feeds, digest))
        self._fingerprints.append((feeds, (digest.hexdigest(), count)))
        return digest.hexdigest(), count

    def run(self, model: ir.Model, passes: Iterable[tuple[str, ir.passes.PassBase]]) -> ir.Model:
        for name, pass_ in passes:
            model = self.run_one(model, name, pass_).model
        return model

    def run_one(self, model: ir.Model, name: str, pass_: ir.passes.PassBase) -> ir.passes.PassResult:
        before_nodes = node_count(model)
        before_notes = len(notes(model))
        start = time.perf_counter()
        result = pass_(model)
        seconds = time.perf_counter() - start
        out = result.model
        new_notes = notes(model)[before_notes:] if out is model else []
        record = PassRecord(name, bool(result.modified), seconds, before_nodes, node_count(out), new_notes)
        self.records.append(record)
        if self._log:
            self._log(f"{name}: modified={record.modified} nodes {before_nodes}->{record.nodes_after} ({seconds * 1e3:.1f} ms)")
        dump = self.options.dump_ir_after
        if name in dump or "all" in dump:
            print(f"--- IR after {name} ---", file=sys.stderr)
            print(onnx.printer.to_text(ir.to_proto(out).graph), file=sys.stderr)
        return result

    def record(self, name: str, seconds: float, model: ir.Model, detail: list[str]) -> None:
        """A stage that is not a pass (calibration) in the same table."""
        count = node_count(model)
        self.records.append(PassRecord(name, False, seconds, count, count, detail))


@dataclass
class CalibrationSummary:
    feeds: int
    samples: int
    seconds: float
    fingerprint: str
    tensors: int
    groups: int
    # The calibration cache file (CalibrationOptions.cache), and whether the ranges came from it.
    cache: str | None = None
    cache_hit: bool = False
    # Groups whose every calibration value was 0 (QParams.zero_range), for a report warning.
    zero_range: tuple[str, ...] = ()


def calibrate_activations(
    model: ir.Model,
    observation: ir.Model,
    feeds: Iterable[dict[str, np.ndarray]],
    *,
    show_progress: bool,
    total: int | None,
    options: CalibrationOptions | None = None,
) -> tuple[dict[str, QParams], CalibrationSummary]:
    """Run the observation model over the feeds; one observer (``options.method``) per qparams group.

    Returns the activation qparams by group, and what was seen (with the data's fingerprint).
    """
    options = options or CalibrationOptions()
    groups = activation_groups(model)
    methods = range_method_overrides(model)
    observers = {
        group: make_observer(spec, dataclasses.replace(options, method=methods[group]) if group in methods else options, group)
        for group, spec in group_specs(model).items()
    }
    digest = hashlib.sha256()
    start = time.perf_counter()
    stats = calibrate(
        ir.to_proto(observation),
        fingerprint_feeds(feeds, digest),
        {name: observers[group] for name, group in groups.items()},
        show_progress=show_progress,
        total=total,
    )
    summary = CalibrationSummary(
        feeds=stats.feeds,
        samples=stats.samples,
        seconds=time.perf_counter() - start,
        fingerprint=digest.hexdigest(),
        tensors=len(groups),
        groups=len(observers),
    )
    return {group: observer.qparams() for group, observer in observers.items()}, summary


def calibration_cache_key(model: ir.Model, data: str, options: CalibrationOptions) -> calibration_cache.CacheKey:
    """The cache key of the annotated ``model``: decided before any model run.

    ``data`` is the feeds' fingerprint (``PassRunner.data_fingerprint``), the same hash
    ``calibrate_activations`` reports.
    """
    return calibration_cache.CacheKey(
        model=calibration_cache.model_fingerprint(model, group_specs(model)),
        data=data,
        settings=calibration_cache.observer_settings(options),
    )


def calibration_stage(
    model: ir.Model,
    feeds: Iterable[dict[str, np.ndarray]],
    total: int | None,
    runner: PassRunner,
    calibration: CalibrationOptions | None = None,
) -> tuple[dict[str, QParams], CalibrationSummary]:
    """insert_observers + calibrate on the annotated ``model``, or the ranges from the cache.

    With ``options.calibration.cache``: the key is computed first (after annotation, before any
    model run); a matching file skips the observation model and the data pass, a file made for
    another key is refused (UsageError) before any work, an absent one is written after calibrating.
    ``calibration`` replaces ``options.calibration`` (the fp16 path forces min/max).
    """
    options = runner.options
    calibration = calibration or options.calibration
    cache_path, cache_key, cached = calibration.cache, None, None
    start = time.perf_counter()
    if cache_path is not None:
        cache_key = calibration_cache_key(model, runner.data_fingerprint(feeds)[0], calibration)
        cached = calibration_cache.read_cache(cache_path, cache_key, group_specs(model))
    if cached is not None:
        summary = CalibrationSummary(
            feeds=cached.feeds,
            samples=cached.samples,
            seconds=time.perf_counter() - start,
            fingerprint=cache_key.data,
            tensors=len(activation_groups(model)),
            groups=len(cached.qparams),
            cache=cache_path,
            cache_hit=True,
        )
        runner.record("calibrate", summary.seconds, model, [f"calibration: from cache {cache_path}"])
        return cached.qparams, summary
    key_seconds = time.perf_counter() - start
    # Observation model: a copy exposing every annotated activation (the annotated IR is kept).
    observation = runner.run_one(model, "insert_observers", InsertObserversPass()).model
    activation_qparams, summary = calibrate_activations(
        model, observation, feeds, show_progress=options.show_progress, total=total, options=calibration
    )
    del observation
    detail = [
        f"{summary.samples} samples in {summary.feeds} batches; {summary.tensors} tensors in "
        f"{summary.groups} qparams groups; ranges by {calibration.method.value}"
    ]
    if cache_key is not None:
        calibration_cache.write_cache(cache_path, cache_key, activation_qparams, feeds=summary.feeds, samples=summary.samples)
        summary.cache = cache_path
        detail.append(f"calibration cache written: {cache_path} (its key took {key_seconds:.2f} s, hashing the data once per compile)")
    runner.record("calibrate", summary.seconds, model, detail)
    return activation_qparams, summary


def precision_policy(options: CompileOptions) -> PrecisionPolicy:
    """The user's per-layer overrides (``keep_float``, ``precision``) as one policy."""
    return PrecisionPolicy(rules_from_options(options.scheme.keep_float, options.precision.precision))


def _annotate(runner: PassRunner, model: ir.Model, policy: PrecisionPolicy) -> AnnotatePass:
    options = runner.options
    return AnnotatePass(options.scheme, profile_for(options.target), policy.float_reasons(model.graph))


def annotate_stage(model: ir.Model, runner: PassRunner, policy: PrecisionPolicy | None = None) -> ir.Model:
    """Annotation under the precision policy and the target: its fp32 and int4 nodes stay float, with the reason."""
    policy = policy or precision_policy(runner.options)
    return runner.run(model, [("annotate", _annotate(runner, model, policy))])


def smoothing_stage(
    model: ir.Model, feeds: Iterable[dict[str, np.ndarray]], total: int | None, runner: PassRunner, policy: PrecisionPolicy
) -> ir.Model:
    """SmoothQuant on the annotated ``model``, then annotation again where it rewired the graph.

    Its statistics cost one pass over the feeds, only when some MatMul/Gemm group can be smoothed
    and the calibration cache (``options.calibration.cache``) holds no decisions for this model,
    data and options; decisions it computes are written there.
    """
    options = runner.options
    cache_path, key, cached = options.calibration.cache, None, None
    if cache_path is not None and find_groups(model)[0]:
        data = runner.data_fingerprint(feeds)[0]
        key = calibration_cache.smoothing_key(model, data, options.smooth_quant, options.scheme, options.calibration)
        cached = calibration_cache.read_smoothing(cache_path, key)

    def statistics(names: list[str]):
        rows, seed = options.smooth_quant.rows, options.calibration.seed
        return collect_channel_stats(model, names, feeds, rows=rows, seed=seed, total=total)

    pass_ = SmoothQuantPass(options.smooth_quant, options.scheme, options.calibration, statistics, cached)
    result = runner.run_one(model, "smooth_quant", pass_)
    if key is not None:
        if pass_.computed:
            calibration_cache.write_smoothing(cache_path, key, pass_.decisions)
            runner.records[-1].notes.append(f"smooth_quant: decisions written to calibration cache {cache_path}")
        else:
            runner.records[-1].notes.append(f"smooth_quant: decisions from calibration cache {cache_path} (no statistics pass)")
    if result.modified:
        if options.smooth_quant.fold_upstream:
            # Before annotation and calibration: they see the weights that took the Mul's scale.
            runner.run_one(model, "fold_smoothing_mul", FoldSmoothingMulPass())
        model = runner.run(model, [("annotate_after_smoothing", _annotate(runner, model, policy))])
    return model


def compile_ir(
    model: ir.Model,
    calibration_feeds: Iterable[dict[str, np.ndarray]],
    total: int | None,
    runner: PassRunner,
    policy: PrecisionPolicy | None = None,
) -> tuple[ir.Model, CalibrationSummary]:
    """The whole pipeline on one IR: clean up → annotate → observe → calibrate → Q/DQ.

    ``model`` is modified in place and returned.
    """
    options = runner.options
    policy = policy or precision_policy(options)
    profile = profile_for(options.target)
    model = runner.run(model, cleanup_passes(options))
    if profile.precision == Precision.FP16:
        return _compile_fp16(model, calibration_feeds, total, runner, profile)
    # Bias correction compares against the cleaned float model (same tensor names and meanings).
    batches = options.calibration.bias_correction_batches
    reference = ir.to_proto(model) if batches else None
    model = annotate_stage(model, runner, policy)
    if options.smooth_quant.enabled:
        # After annotation (it declines tensors made by int8 ops), before calibration (which sees the
        # smoothed tensors). The cache key hashes the smoothed weights, so it covers the choice.
        model = smoothing_stage(model, calibration_feeds, total, runner, policy)
    # After annotation: observers are per annotated group, and the cache key hashes the annotated model.
    activation_qparams, summary = calibration_stage(model, calibration_feeds, total, runner)
    summary.zero_range = tuple(group for group, qparams in activation_qparams.items() if qparams.zero_range)
    rounding_feeds: list[Feed] = []
    if options.calibration.weight_rounding == WeightRounding.OPTIMIZED:
        rounding_feeds = list(itertools.islice(iter(calibration_feeds), ROUNDING_BATCHES))
    model = runner.run(model, finalize_passes(activation_qparams, options, rounding_feeds, policy.int4_nodes(model.graph)))
    if reference is not None:
        # After placement: it measures the quantized model as it will run.
        feeds = list(itertools.islice(iter(calibration_feeds), batches))
        model = runner.run(model, [("correct_bias", CorrectBiasPass(reference, feeds))])
    # Last: the passes read intermediate dtypes; the output file leaves them to onnxruntime.
    model = runner.run(model, [("clear_intermediate_shapes", ClearIntermediateShapesPass())])
    return model, summary


def _compile_fp16(
    model: ir.Model, feeds: Iterable[dict[str, np.ndarray]], total: int | None, runner: PassRunner, profile: TargetProfile
) -> tuple[ir.Model, CalibrationSummary]:
    """clean up → mark every float tensor → calibrate its range → fp16 with fp32 where it would overflow."""
    options = runner.options
    model = runner.run(model, [("annotate_ranges", AnnotateRangesPass())])
    # Overflow is about the largest value seen, not a clipped range: min/max whatever the method.
    calibration = dataclasses.replace(options.calibration, method=CalibrationMethod.MINMAX)
    qparams, summary = calibration_stage(model, feeds, total, runner, calibration)
    model = runner.run(model, fp16_passes(max_abs_from_qparams(qparams), profile, options))
    return model, summary
