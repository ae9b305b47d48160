"""The Python API: ``compile_model`` and ``verify``. The CLI is a thin layer over these."""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from qcompile import __version__
from qcompile.data import FeedSource, feeds_from_iterable, feeds_from_path, input_specs, limit, random_feeds, split_holdout
from qcompile.errors import InternalError, UsageError
from qcompile.graph.io import load_model, save_model_atomic, write_bytes_atomic
from qcompile.graph.notes import notes
from qcompile.graph.queries import opset_version
from qcompile.options import CompileOptions
from qcompile.pipeline import CalibrationSummary, PassRunner, compile_ir
from qcompile.passes.annotate import decision_summary, quantized_node_names
from qcompile.passes.convert_fp16 import precision_summary
from qcompile.quant.spec import DECISION_KEY, NOT_FLOAT_DATA
from qcompile.report.model import CompileReport, FloatNode, QuantizationSummary
from qcompile.targets import Precision, TargetProfile, profile_for
from qcompile.verify.analysis import Analysis
from qcompile.verify.analysis import analyze as analyze_models
from qcompile.verify.compare import VerificationResult, compare_models
from qcompile.verify.fusion import check_fusion
from qcompile.verify.latency import report_latency
from qcompile.verify.placement import node_placement
from qcompile.verify.sessions import cuda_available
from qcompile.verify.structure import check_tensorrt_structure

CalibrationData = str | os.PathLike | FeedSource | Iterable[Any]
RANDOM = "random"


@dataclass
class CompileResult:
    model: onnx.ModelProto
    report: CompileReport
    verification: VerificationResult | None
    # With a budget or a recipe (qcompile.precision): the recipe and the Pareto page to save.
    precision: Any = None

    @property
    def failure(self) -> str | None:
        """Why the compile misses a gate (``min_sqnr``, ``strict_fusion``, a budget), or None."""
        if self.precision is not None and self.precision.unmet:
            return f"FAIL: {self.precision.unmet}"
        verification = self.report.verification
        if verification is not None and not verification.get("passed", True):
            return verification["verdict"]
        fusion = self.report.fusion
        if self.report.options["verification"]["strict_fusion"] and fusion is not None and not fusion["fused"]:
            return f"FAIL: strict fusion: {fusion['summary']}"
        structure = (self.report.target or {}).get("structure")
        if structure is not None and not structure["passed"]:
            return f"FAIL: {structure['summary']}"
        return None

    @property
    def verification_passed(self) -> bool:
        return self.failure is None

    def save(self, path: str | os.PathLike, *, force: bool = False) -> Path:
        """Write the report (``PATH.report.json``) first, then the model: the model file is the commit point."""
        path = Path(path)
        if path.exists() and not force:
            save_model_atomic(self.model, path, force=False)  # raises OutputExistsError
        self.report.output_path = str(path)
        write_bytes_atomic(report_path(path), self.report.to_json_text().encode())
        if self.precision is not None and self.report.precision.get("mode") == "search":
            self.precision.recipe.save(f"{os.fspath(path)}.recipe.json")
            write_bytes_atomic(Path(f"{os.fspath(path)}.pareto.html"), self.precision.html.encode())
        save_model_atomic(self.model, path, force=force)  # force also covers a stray <path>.data
        return path


def report_path(model_path: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(model_path)}.report.json")


def _feed_source(data: CalibrationData, specs, role: str, options: CompileOptions) -> FeedSource:
    if isinstance(data, FeedSource):
        return data
    if isinstance(data, str) and data == RANDOM:
        return random_feeds(specs, options.calibration.random_samples, options.calibration.seed)
    if isinstance(data, (str, os.PathLike)):
        return feeds_from_path(data, specs, role=role)
    return feeds_from_iterable(data, specs, role=role)


def compile_model(
    model: str | os.PathLike | onnx.ModelProto | ir.Model,
    calibration: CalibrationData,
    options: CompileOptions | None = None,
    *,
    verify_data: CalibrationData | None = None,
    budget: Any = None,
) -> CompileResult:
    """Quantize ``model`` to an int8 QDQ model calibrated on ``calibration``, and verify it.

    ``calibration``: a folder of .npz files, a .npz/.npy file, an iterable of feed dicts (or a torch
    DataLoader), a ``FeedSource``, or ``"random"`` (a loud warning in the report). Without
    ``verify_data``, verification uses a held-out part of the calibration data (said in the report).
    The input model is never modified.

    ``budget`` (or ``options.precision.budget``): search per-layer precisions for the cheapest model
    meeting it — a ``qcompile.precision.budget.Budget``, budget text, or a callable
    ``(float_outputs, quantized_outputs) -> (value, ok)``. ``options.precision.recipe`` replays a search.
    """
    options = options or CompileOptions()
    start = time.perf_counter()
    loaded = load_model(model)
    float_proto = ir.to_proto(loaded.model)
    float_size = float_proto.ByteSize()
    # Bounds the input already breaks fail before any work (and are checked again on the output).
    _check_output_bounds(loaded.model, options)
    specs = input_specs(loaded.model)
    warnings: list[str] = []
    report_notes = list(loaded.notes)

    calib = _feed_source(calibration, specs, "calibration", options)
    is_random = isinstance(calibration, str) and calibration == RANDOM
    if is_random:
        warnings.append(
            "calibrated on RANDOM data: ranges do not reflect real inputs; accuracy on real data is unknown"
        )
    verify_source = None
    if options.verification.enabled:
        if verify_data is not None:
            verify_source = _feed_source(verify_data, specs, "verification", options)
            verify_desc = verify_source.describe()
        else:
            calib, verify_source = split_holdout(calib, options.verification.holdout_fraction)
            verify_desc = f"held-out part of the calibration data ({verify_source.describe()})"
            report_notes.append(f"no verification data given: verified on {verify_desc}")
        if options.verification.max_samples:
            verify_source = limit(verify_source, options.verification.max_samples)
    if options.calibration.max_samples:
        calib = limit(calib, options.calibration.max_samples)

    runner = PassRunner(options)
    mixed = None
    if budget is not None or options.precision.budget or options.precision.recipe:
        from qcompile.precision.compile import as_budget, compile_mixed

        mixed = compile_mixed(loaded.model, calib, len(calib), runner, verify_feeds=verify_source, budget=as_budget(budget))
        qmodel, calibration_summary = mixed.model, mixed.summary
    else:
        qmodel, calibration_summary = compile_ir(loaded.model, calib, len(calib), runner)
    warnings += _calibration_warnings(calibration_summary)
    _check_output_bounds(qmodel, options)
    qmodel.metadata_props["qcompile.version"] = __version__
    if mixed is None:
        qmodel.metadata_props["qcompile.options"] = json.dumps(options.to_dict(), sort_keys=True)
    else:
        # A search and its recipe replay give the same bytes: the metadata holds the settings that
        # shape the model and the assignment, not the budget, recipe path or display flags.
        qmodel.metadata_props["qcompile.options"] = json.dumps(mixed.recipe.settings, sort_keys=True)
        qmodel.metadata_props["qcompile.precision"] = json.dumps(mixed.recipe.to_json()["layers"], sort_keys=True)
    qmodel.metadata_props["qcompile.calibration_fingerprint"] = calibration_summary.fingerprint
    quant_proto = ir.to_proto(qmodel)
    try:
        onnx.checker.check_model(quant_proto)
    except onnx.checker.ValidationError as exc:
        raise InternalError(f"the quantized model fails onnx.checker: {str(exc).splitlines()[0]}") from None

    profile = profile_for(options.target)
    if profile.overrides:
        report_notes.append(profile.overrides)
    provider, not_on_target = _verification_provider(profile)
    fusion_json = None
    if profile.cpu_fusion_check:
        # What onnxruntime really runs (CPU): are the quantized ops fused into int8 kernels?
        fusion = check_fusion(quant_proto, quantized_by_decision=quantized_node_names(qmodel))
        fusion_json = {**fusion.to_json(), "summary": fusion.summary()}

    verification = None
    verification_json = None
    latency_json = None
    target_json = _target_section(profile, provider, not_on_target, qmodel, quant_proto)
    if verify_source is not None:
        layer_names = _layer_names(qmodel, float_proto) if options.verification.per_layer else None
        verification = compare_models(
            float_proto, quant_proto, verify_source, provider=provider, show_progress=options.show_progress,
            layer_names=layer_names,
        )
        verification_json = _verdict(verification, options.verification.min_sqnr, verify_desc)
        # One feed (read once) for the latency runs and the GPU placement check.
        sample = next(iter(verify_source)) if options.verification.latency or provider == "cuda" else None
        if options.verification.latency:
            fixed = {spec.name: spec.shape[0] if spec.shape and isinstance(spec.shape[0], int) else None for spec in specs}
            latency_json = report_latency(float_proto, quant_proto, sample, fixed, provider=provider)
        if provider == "cuda":
            # On a GPU: the nodes that fell back to the CPU and the host copies around them.
            target_json["placement"] = node_placement(quant_proto, sample, "cuda").to_json()

    report = CompileReport(
        qcompile_version=__version__,
        source=loaded.source,
        options=options.to_dict(),
        passes=runner.records,
        quantization=_quantization_summary(qmodel),
        float_size_bytes=float_size,
        quantized_size_bytes=quant_proto.ByteSize(),
        opset=opset_version(qmodel),
        domains=sorted({n.domain or "ai.onnx" for n in quant_proto.graph.node}),
        output_ops=dict(Counter(n.op_type for n in quant_proto.graph.node)),
        calibration={
            "source": calib.describe(),
            "random": is_random,
            "feeds": calibration_summary.feeds,
            "samples": calibration_summary.samples,
            "seconds": round(calibration_summary.seconds, 4),
            "fingerprint": calibration_summary.fingerprint,
            "method": options.calibration.method.value,
            "cache": calibration_summary.cache,
            "cache_hit": calibration_summary.cache_hit,
        },
        verification=verification_json,
        fusion=fusion_json,
        target=target_json,
        latency=latency_json,
        notes=report_notes + notes(qmodel),
        warnings=warnings,
        seconds=time.perf_counter() - start,
        precision=None if mixed is None else mixed.report,
    )
    # Pass notes are printed with their pass; keep the top-level list for load/data notes.
    report.notes = report_notes
    return CompileResult(model=quant_proto, report=report, verification=verification, precision=mixed)


def _verdict(result: VerificationResult, min_sqnr: float | None, data_desc: str) -> dict[str, Any]:
    out = result.to_json()
    out["data"] = data_desc
    out["min_sqnr_threshold"] = min_sqnr
    out["passed"] = result.passed(min_sqnr)
    if min_sqnr is None:
        out["verdict"] = f"ran on {result.provider.upper()}; no threshold set (lowest output SQNR {result.min_sqnr:.2f} dB)"
    elif out["passed"]:
        out["verdict"] = f"PASS: lowest output SQNR {result.min_sqnr:.2f} dB >= {min_sqnr} dB"
    else:
        out["verdict"] = f"FAIL: lowest output SQNR {result.min_sqnr:.2f} dB < {min_sqnr} dB"
    return out


def _verification_provider(profile: TargetProfile) -> tuple[str, str | None]:
    """The provider that verifies and times the compiled model, and why that is not the target's."""
    if profile.session_provider == "cpu":
        return "cpu", None
    if profile.session_provider == "cuda" and cuda_available():
        return "cuda", None
    if profile.session_provider is None:
        why = f"qcompile's sessions do not run {profile.execution_provider}"
    else:
        why = f"onnxruntime's {profile.execution_provider} is absent or unusable on this machine"
    checks = " plus the structure checks" if profile.structure_checks else ""
    return "cpu", f"not verified on target: {why}; verified and timed on CPU{checks}"


def _target_section(
    profile: TargetProfile, provider: str, not_on_target: str | None, model: ir.Model, proto: onnx.ModelProto
) -> dict[str, Any]:
    section: dict[str, Any] = {
        "name": profile.name.value,
        "profile": profile.to_json(),
        "verified_on": provider,
        "verified_on_target": not_on_target is None,
        "note": not_on_target,
    }
    if profile.precision == Precision.FP16:
        section["precision"] = precision_summary(model)
    if profile.structure_checks:
        kept = frozenset(n.name for n in model.graph if (d := n.meta.get(DECISION_KEY)) is not None and not d.quantized)
        structure = check_tensorrt_structure(proto, kept)
        section["structure"] = {**structure.to_json(), "summary": structure.summary()}
    return section


def _calibration_warnings(summary: CalibrationSummary) -> list[str]:
    """A single calibration sample, and activations that were 0 on every sample (zero range)."""
    out = []
    if summary.samples == 1:
        out.append("calibrated on a single sample: ranges from one sample rarely cover real inputs")
    zero = summary.zero_range
    if zero:
        shown = ", ".join(repr(name) for name in zero[:5]) + (f" and {len(zero) - 5} more" if len(zero) > 5 else "")
        out.append(
            f"{len(zero)} activation(s) were 0 on every calibration sample (zero range: quantized with "
            f"scale 1, so only their integer values survive): {shown}"
        )
    return out


def _check_output_bounds(model: ir.Model, options: CompileOptions) -> None:
    opset = opset_version(model)
    if options.output.max_opset is not None and opset > options.output.max_opset:
        raise UsageError(
            f"the model uses opset {opset}, above max_opset {options.output.max_opset} "
            "(qcompile does not lower opsets)"
        )
    if not options.output.allow_contrib_ops:
        contrib = sorted({n.domain for n in model.graph.all_nodes() if n.domain not in ("", "ai.onnx")})
        if contrib:
            raise UsageError(f"no_contrib_ops was asked but the input model already uses domains {contrib}")


def _quantization_summary(model: ir.Model) -> QuantizationSummary:
    quantized, left_float = decision_summary(model)
    float_nodes = [FloatNode(name, op, reason, reason == NOT_FLOAT_DATA) for name, op, reason in left_float]
    kinds: Counter = Counter()
    for node in model.graph:
        if node.op_type in ("QuantizeLinear", "DynamicQuantizeLinear"):
            kinds["activations"] += 1
        elif node.op_type == "MatMulInteger" and node.inputs[1].const_value is not None:
            kinds["weights"] += 1  # quantize_dynamic_matmul's: read as int8, with no DequantizeLinear
        elif node.op_type == "DequantizeLinear" and node.inputs[0].const_value is not None:
            dtype = node.inputs[0].dtype
            kinds[{ir.DataType.INT8: "weights", ir.DataType.INT32: "biases"}.get(dtype, "constants")] += 1
    return QuantizationSummary(
        quantized_ops=quantized,
        float_nodes=float_nodes,
        activations=kinds["activations"],
        weights=kinds["weights"],
        biases=kinds["biases"],
        constants=kinds["constants"],
    )


def _layer_names(model: ir.Model, float_proto: onnx.ModelProto) -> list[str]:
    """Outputs of quantized nodes that the float model also has, in graph order."""
    float_names = {o for n in float_proto.graph.node for o in n.output}
    names = []
    for node in model.graph:
        decision = node.meta.get(DECISION_KEY)
        if decision is not None and decision.quantized:
            names += [o.name for o in node.outputs if o.name in float_names and o.name not in names]
    return names


def verify(
    float_model: str | os.PathLike | onnx.ModelProto,
    quant_model: str | os.PathLike | onnx.ModelProto,
    data: CalibrationData,
    *,
    min_sqnr: float | None = None,
    per_layer: bool = False,
    show_progress: bool = False,
    provider: str = "cpu",
) -> dict[str, Any]:
    """Compare a quantized model with its float original on ``data``.

    Returns the verification as a JSON-ready dict with ``passed`` (against ``min_sqnr``) and a
    ``verdict`` line; the CLI turns a failed verdict into exit code 5.
    """
    float_loaded = load_model(float_model)
    quant_loaded = load_model(quant_model)
    options = CompileOptions()
    source = _feed_source(data, input_specs(float_loaded.model), "verification", options)
    float_proto = ir.to_proto(float_loaded.model)
    quant_proto = ir.to_proto(quant_loaded.model)
    layer_names = None
    if per_layer:
        quant_outputs = {o for n in quant_proto.graph.node if n.op_type not in ("QuantizeLinear", "DequantizeLinear") for o in n.output}
        layer_names = [o for n in float_proto.graph.node for o in n.output if o in quant_outputs]
    result = compare_models(
        float_proto, quant_proto, source, provider=provider, show_progress=show_progress, layer_names=layer_names
    )
    return _verdict(result, min_sqnr, source.describe())


def analyze(
    float_model: str | os.PathLike | onnx.ModelProto,
    quant_model: str | os.PathLike | onnx.ModelProto,
    data: CalibrationData,
    *,
    drop_db: float = 6.0,
) -> Analysis:
    """Per-layer error of a quantized model against its float original (see ``qcompile.verify.analysis``)."""
    float_loaded = load_model(float_model)
    quant_loaded = load_model(quant_model)
    source = _feed_source(data, input_specs(float_loaded.model), "analysis", CompileOptions())
    return analyze_models(ir.to_proto(float_loaded.model), ir.to_proto(quant_loaded.model), source, drop_db=drop_db)
