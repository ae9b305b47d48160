"""Run the quantization passes on a tiny model with real calibration (shared by pass tests)."""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from qcompile.options import SchemeOptions
from qcompile.passes import AnnotatePass, AssignQParamsPass, DeriveBiasPass, InsertObserversPass, PlaceQDQPass
from qcompile.pipeline import calibrate_activations


def annotate_and_calibrate(model: ir.Model, feeds, scheme: SchemeOptions | None = None) -> ir.Model:
    """Shape inference, annotation, calibration and AssignQParamsPass, in place."""
    common_passes.ShapeInferencePass()(model)
    AnnotatePass(scheme or SchemeOptions())(model)
    observation = InsertObserversPass()(model).model
    qparams, _ = calibrate_activations(model, observation, feeds, show_progress=False, total=None)
    AssignQParamsPass(qparams)(model)
    return model


def quantize(model: ir.Model, feeds, scheme: SchemeOptions | None = None) -> ir.Model:
    annotate_and_calibrate(model, feeds, scheme)
    DeriveBiasPass()(model)
    PlaceQDQPass()(model)
    common_passes.RemoveUnusedNodesPass()(model)
    common_passes.TopologicalSortPass()(model)
    return model
