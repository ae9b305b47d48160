"""RemoveDropoutPass: an inference-time Dropout is the identity, so it is removed.

Rule (ONNX ``Dropout``): in inference mode ``output = data``. A Dropout is in inference mode when

- opsets 7-11: always; the ``ratio`` attribute only matters in training (opset 7 dropped ``is_test``);
- opsets 12+: the ``training_mode`` input is absent or a constant False (the spec's default is
  False). A ``training_mode`` that is computed at run time or is constant True really drops, so that
  node stays and a note says why. ``ratio`` (attribute or input) is irrelevant in inference;
- opsets 1-6: the ``is_test`` attribute is nonzero (the spec's default, 0, means training).

Rewrite: every reader of ``output`` reads ``data``. A graph output keeps its name: ``data`` takes the
name when it is an internal value of the same graph, otherwise (``data`` is a graph input, an
initializer, an outer-scope value or itself a graph output, whose names are part of the interface)
an ``Identity`` carries the name.

The optional ``mask`` output, when something reads it: from opset 12 the spec's
``output = scale·data·mask`` makes the inference mask all true (onnxruntime and the ONNX reference
agree), so it becomes a constant of the data's shape when that shape is static; when it is not, the
node stays with a note. Before opset 12 the spec leaves the inference mask undefined and runtimes
disagree (onnxruntime returns all zeros/false, the ONNX reference all ones), so a Dropout of opsets
7-11 whose mask is read stays with a note.

Scope: the main graph and every subgraph (If/Loop/Scan bodies). Dropout inside model-local functions
is not handled.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompile.graph.notes import add_note
from qcompile.graph.queries import constant_array, opset_version


class RemoveDropoutPass(ir.passes.InPlacePass):
    """Remove every Dropout that is the identity at inference; note the ones that are not."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        opset = opset_version(model)
        modified = False
        # A list first: removing nodes while the recursive iterator walks the graph is not safe.
        dropouts = [n for n in model.graph.all_nodes() if n.op_type == "Dropout" and n.domain in ("", "ai.onnx")]
        for node in dropouts:
            reason = _why_not_identity(node, opset) or _why_mask_unavailable(node, opset)
            if reason is not None:
                add_note(model, f"Dropout {_label(node)} kept: {reason}")
                continue
            _remove(node)
            modified = True
        return ir.passes.PassResult(model, modified=modified)


def _why_not_identity(node: ir.Node, opset: int) -> str | None:
    """Why this Dropout may drop at run time, or None when it is the identity."""
    if opset < 7 and node.attributes.get_int("is_test", 0) == 0:
        return "is_test is 0 (training mode, the default before opset 7), so it drops at run time"
    training_mode = node.inputs[2] if len(node.inputs) > 2 else None
    if training_mode is None:
        return None
    flag = constant_array(training_mode)
    if flag is None:
        return f"its training_mode input {training_mode.name!r} is computed at run time, so it may drop"
    if bool(np.asarray(flag).reshape(-1)[0]):
        return "its training_mode input is constant True, so it drops at run time"
    return None


def _mask(node: ir.Node) -> ir.Value | None:
    """The mask output when something reads it (a node or a graph output), else None."""
    if len(node.outputs) < 2:
        return None
    mask = node.outputs[1]
    return mask if mask.uses() or mask.is_graph_output() else None


def _static_shape(node: ir.Node) -> tuple[int, ...] | None:
    # data, output and mask all have the same shape; any one that is known fully will do.
    for value in (node.inputs[0], node.outputs[0], *node.outputs[1:]):
        if value is not None and value.shape is not None and value.shape.is_static():
            return tuple(value.shape.numpy())
    return None


def _why_mask_unavailable(node: ir.Node, opset: int) -> str | None:
    if _mask(node) is None:
        return None
    if opset < 12:
        return (
            f"its mask output is used, and at opset {opset} the inference mask is undefined "
            "(onnxruntime gives all false, the ONNX reference all true)"
        )
    if _static_shape(node) is None:
        return "its mask output is used and the data's shape is not static, so no constant can stand for it"
    return None


def _remove(node: ir.Node) -> None:
    graph = node.graph
    assert graph is not None
    mask = _mask(node)
    if mask is not None:
        _replace_mask_with_constant(node, mask)
    _bypass(node, node.outputs[0], node.inputs[0])
    graph.remove(node, safe=True)


def _replace_mask_with_constant(node: ir.Node, mask: ir.Value) -> None:
    shape = _static_shape(node)
    assert shape is not None, "checked by _why_mask_unavailable"
    # Only reached from opset 12 on, where the mask is bool.
    ones = ir.tensor(np.ones(shape, dtype=np.bool_), dtype=ir.DataType.BOOL)
    constant = ir.node("Constant", [], attributes={"value": ones})
    # A Constant node rather than an initializer: it works the same way in a subgraph, and the
    # mask keeps its name whether or not it is a graph output.
    node.graph.insert_before(node, constant)
    name = mask.name
    mask.replace_all_uses_with(constant.outputs[0], replace_graph_outputs=True)
    constant.outputs[0].name = name
    constant.outputs[0].type = ir.TensorType(ir.DataType.BOOL)
    constant.outputs[0].shape = ir.Shape(shape)


def _bypass(node: ir.Node, old: ir.Value, new: ir.Value) -> None:
    """Make every reader of ``old`` (an output of ``node``) read ``new``; a graph output keeps its name."""
    graph = node.graph
    if not old.is_graph_output():
        old.replace_all_uses_with(new)
        return
    name = old.name
    producer = new.producer()
    if producer is not None and producer.graph is graph and not new.is_graph_output():
        # An internal value of this graph: nothing outside the graph knows its name, so it can
        # take the output's name.
        old.replace_all_uses_with(new, replace_graph_outputs=True)
        if new.type is None:
            new.type = old.type
        if new.shape is None:
            new.shape = old.shape
        new.name = name
        return
    # Graph inputs, initializers, outer-scope values and other graph outputs are named by the
    # interface; renaming them would break it, so an Identity carries the output's name instead.
    identity = ir.node("Identity", [new])
    graph.insert_before(node, identity)
    carried = identity.outputs[0]
    old.replace_all_uses_with(carried, replace_graph_outputs=True)
    carried.type = old.type if old.type is not None else new.type
    carried.shape = old.shape if old.shape is not None else new.shape
    carried.name = name


def _label(node: ir.Node) -> str:
    return repr(node.name or node.outputs[0].name)
