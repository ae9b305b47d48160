"""Run the quantization passes on a tiny model with real calibration (shared by pass tests)."""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from qcompile.calibration.collect import calibrate
from qcompile.calibration.observers import MinMaxObserver
from qcompile.options import SchemeOptions
from qcompile.passes import AnnotatePass, AssignQParamsPass, DeriveBiasPass, InsertObserversPass, PlaceQDQPass
from qcompile.passes.insert_observers import activation_groups
from qcompile.quant.spec import ANNOTATION_KEY, ActivationAnnotation


def annotate_and_calibrate(model: ir.Model, feeds, scheme: SchemeOptions | None = None) -> ir.Model:
    """Shape inference, annotation, calibration and AssignQParamsPass, in place."""
    common_passes.ShapeInferencePass()(model)
    AnnotatePass(scheme or SchemeOptions())(model)
    observation = InsertObserversPass()(model).model
    groups = activation_groups(model)
    specs = {}
    for value in list(model.graph.inputs) + [o for n in model.graph for o in n.outputs]:
        annotation = value.meta.get(ANNOTATION_KEY)
        if isinstance(annotation, ActivationAnnotation):
            specs[annotation.group] = annotation.spec
    observers = {g: MinMaxObserver(s, g) for g, s in specs.items()}
    calibrate(ir.to_proto(observation), feeds, {n: observers[g] for n, g in groups.items()}, show_progress=False)
    AssignQParamsPass({g: o.qparams() for g, o in observers.items()})(model)
    return model


def quantize(model: ir.Model, feeds, scheme: SchemeOptions | None = None) -> ir.Model:
    annotate_and_calibrate(model, feeds, scheme)
    DeriveBiasPass()(model)
    PlaceQDQPass()(model)
    common_passes.RemoveUnusedNodesPass()(model)
    common_passes.TopologicalSortPass()(model)
    return model
