"""One calibration, many candidate models: activation ranges by tensor, and builds from them.

Calibration computes qparams per annotated group. A candidate assignment annotates the same cleaned
model with more nodes kept float; its groups are then (mostly) subsets of the calibrated ones, with
the same member tensors. So ranges are stored by tensor — every annotated tensor takes its group's
qparams — and a candidate's group takes the range of its representative tensor, or failing that of
any member. No candidate ever re-runs calibration, and a recipe replays from these same numbers.

A candidate can also quantize a tensor the all-int8 annotation did not: keeping a Conv float stops
its producer's Relu from being quantized, so the producer's pre-activation output becomes the int8
boundary. So before the one calibration, ``observe_every_activation`` marks every float tensor a
quantizable node produces (each its own group) for observation too: every candidate then finds a
calibrated range for every tensor it quantizes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import onnx
import onnx_ir as ir

from qcompile.errors import UsageError
from qcompile.options import CompileOptions
from qcompile.pipeline import PassRunner, annotate_stage, finalize_passes
from qcompile.precision.policy import PrecisionPolicy
from qcompile.passes.op_rules import rule_for
from qcompile.quant.qparams import QParams
from qcompile.quant.spec import ANNOTATION_KEY, ActivationAnnotation, QuantSpec


def annotated_activations(model: ir.Model) -> list[tuple[ir.Value, ActivationAnnotation]]:
    values = list(model.graph.inputs) + [out for node in model.graph for out in node.outputs]
    return [(v, a) for v in values if isinstance(a := v.meta.get(ANNOTATION_KEY), ActivationAnnotation)]


def observe_every_activation(model: ir.Model, spec: QuantSpec) -> int:
    """Annotate (for calibration only) every unannotated float output of a node in the op table."""
    added = 0
    for node in model.graph:
        if rule_for(node.op_type, node.domain) is None:
            continue
        for value in node.outputs:
            if value.dtype == ir.DataType.FLOAT and value.meta.get(ANNOTATION_KEY) is None:
                value.meta[ANNOTATION_KEY] = ActivationAnnotation(spec, value.name)
                added += 1
    return added


def ranges_by_tensor(model: ir.Model, group_qparams: Mapping[str, QParams]) -> dict[str, QParams]:
    """Every annotated activation tensor of ``model`` -> its calibrated group's qparams."""
    return {value.name: group_qparams[a.group] for value, a in annotated_activations(model) if a.group in group_qparams}


def group_qparams_from_tensors(model: ir.Model, tensor_ranges: Mapping[str, QParams]) -> dict[str, QParams]:
    """The annotated ``model``'s group qparams, read from the ranges by tensor (no calibration)."""
    out: dict[str, QParams] = {}
    for value, annotation in annotated_activations(model):
        if annotation.group in out:
            continue
        qparams = tensor_ranges.get(annotation.group) or tensor_ranges.get(value.name)
        if qparams is not None and qparams.spec == annotation.spec:
            out[annotation.group] = qparams
    missing = {a.group for _, a in annotated_activations(model)} - set(out)
    if missing:
        shown = ", ".join(sorted(missing)[:3])
        raise UsageError(f"no calibrated range for {len(missing)} activation group(s) of this assignment ({shown}); recalibrate")
    return out


@dataclass
class Candidate:
    model: ir.Model  # with its decisions (node meta), for the report
    proto: onnx.ModelProto


def build_candidate(
    cleaned: onnx.ModelProto,
    tensor_ranges: Mapping[str, QParams],
    policy: PrecisionPolicy,
    options: CompileOptions,
    runner: PassRunner | None = None,
) -> Candidate:
    """The quantized model of one assignment, from the cleaned float model and the cached ranges.

    Deterministic: the same inputs give the same bytes (a recipe replay relies on it).
    """
    runner = runner or PassRunner(options)
    model = ir.from_proto(cleaned)
    model = annotate_stage(model, runner, policy)
    group_qparams = group_qparams_from_tensors(model, tensor_ranges)
    model = runner.run(model, finalize_passes(group_qparams, options, int4_nodes=policy.int4_nodes(model.graph)))
    return Candidate(model, ir.to_proto(model))
