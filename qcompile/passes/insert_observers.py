"""InsertObserversPass: build the observation model, a copy exposing every tensor to calibrate.

Rule: every tensor carrying an ``ActivationAnnotation`` becomes a graph output of the copy, so one
onnxruntime run per calibration batch yields all of them. A graph input is exposed through an
Identity named ``observed_name(input)`` (a graph input cannot also be listed as an output; the copy
is built by ``graph/observation``). The observers themselves live in ``qcompile.calibration``: this
pass only decides what they see.

It is a FunctionalPass: the annotated model is left untouched (its annotations live in memory and
would not survive a copy).
"""

from __future__ import annotations

import onnx_ir as ir

from qcompile.graph.observation import observation_model, observed_name
from qcompile.quant.spec import ANNOTATION_KEY, RANGE_METHOD_KEY, ActivationAnnotation, QuantSpec

def activation_groups(model: ir.Model) -> dict[str, str]:
    """Observation output name → qparams group, for every annotated activation, in graph order."""
    result: dict[str, str] = {}
    graph = model.graph
    candidates = list(graph.inputs) + [out for node in graph for out in node.outputs]
    for value in candidates:
        annotation = value.meta.get(ANNOTATION_KEY)
        if isinstance(annotation, ActivationAnnotation):
            result[observed_name(value)] = annotation.group
    return result


def group_specs(model: ir.Model) -> dict[str, QuantSpec]:
    """qparams group → the spec its observer computes qparams for."""
    specs: dict[str, QuantSpec] = {}
    for value in list(model.graph.inputs) + [out for node in model.graph for out in node.outputs]:
        annotation = value.meta.get(ANNOTATION_KEY)
        if isinstance(annotation, ActivationAnnotation):
            specs[annotation.group] = annotation.spec
    return specs


def range_method_overrides(model: ir.Model) -> dict[str, object]:
    """qparams group → the calibration method a pass chose for one of its tensors (SmoothQuant)."""
    overrides: dict[str, object] = {}
    for value in list(model.graph.inputs) + [out for node in model.graph for out in node.outputs]:
        annotation = value.meta.get(ANNOTATION_KEY)
        if isinstance(annotation, ActivationAnnotation) and RANGE_METHOD_KEY in value.meta:
            overrides[annotation.group] = value.meta[RANGE_METHOD_KEY]
    return overrides


class InsertObserversPass(ir.passes.FunctionalPass):
    def __init__(self, names: list[str] | None = None) -> None:
        super().__init__()
        # Tensors to expose instead of every annotated activation (SmoothQuant's statistics).
        self.names = names

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if self.names is None:
            candidates = list(model.graph.inputs) + [out for node in model.graph for out in node.outputs]
            names = [v.name for v in candidates if isinstance(v.meta.get(ANNOTATION_KEY), ActivationAnnotation)]
        else:
            names = list(self.names)
        return ir.passes.PassResult(observation_model(model, names), modified=bool(names))
