"""Observation models: a copy of a model with chosen tensors made graph outputs.

One onnxruntime run of the copy per calibration batch yields every chosen tensor. Calibration
(``passes/insert_observers`` picks the annotated activations) and SmoothQuant's channel statistics
(``calibration/channel_stats`` picks the tensors it smooths) both build one; here, below both, so
neither imports the other.
"""

from __future__ import annotations

from collections.abc import Sequence

import onnx_ir as ir

_OBSERVED_PREFIX = "qcompile_observed__"


def observed_name(value: ir.Value) -> str:
    """The observation model's output name for a tensor.

    A graph input cannot also be listed as a graph output, so an input is exposed through an
    Identity with a prefixed name.
    """
    return _OBSERVED_PREFIX + value.name if value.is_graph_input() else value.name


def observation_model(model: ir.Model, names: Sequence[str]) -> ir.Model:
    """A copy of ``model`` whose outputs also hold the tensors ``names`` (in that order), each as
    ``observed_name``.

    The copy goes through a proto round trip: ``model`` and its in-memory metadata are untouched.
    """
    wanted = set(names)
    observed_inputs = [v.name for v in model.graph.inputs if v.name in wanted]
    copy = ir.from_proto(ir.to_proto(model))
    graph = copy.graph
    by_name = {v.name: v for v in graph.inputs}
    by_name.update({out.name: out for node in graph for out in node.outputs})
    already_output = {v.name for v in graph.outputs}
    for name in observed_inputs:
        value = by_name[name]
        identity = ir.node("Identity", [value], outputs=[ir.Value(name=_OBSERVED_PREFIX + name)])
        identity.outputs[0].dtype = value.dtype
        identity.outputs[0].shape = value.shape
        graph.insert_before(graph.node(0), identity) if len(graph) else graph.append(identity)
        by_name[identity.outputs[0].name] = identity.outputs[0]
    for name in names:
        exposed = _OBSERVED_PREFIX + name if name in observed_inputs else name
        if exposed not in already_output:
            graph.outputs.append(by_name[exposed])
            already_output.add(exposed)
    return copy
