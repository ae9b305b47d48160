"""FoldBatchNormPass: fold an inference BatchNormalization into the op that produces its input.

BatchNormalization in inference mode (ONNX spec; ``epsilon`` defaults to 1e-5) is an affine map per
channel c, the input's axis 1:

    y = γ[c]·(x - μ[c]) / sqrt(σ²[c] + ε) + β[c]  =  a[c]·x + b[c],
    a = γ / sqrt(σ² + ε),    b = β - a·μ.

The producers below are linear per output channel, so the map moves into their weights:

- Conv, weight (C_out, C_in/group, k...): W'[o] = a[o]·W[o], bias' = a·bias + b (bias 0 when absent;
  the input is added). ``group`` does not change this: output channels are on axis 0 either way.
- ConvTranspose, weight (C_in, C_out/group, k...): output channel o = g·(C_out/group) + j is made
  from W[g·(C_in/group):(g+1)·(C_in/group), j], so W seen as (group, C_in/group, C_out/group, k...)
  is scaled by a seen as (group, 1, C_out/group, 1...). bias' as for Conv.
- Gemm, y = alpha·op(A)·op(B) + beta·C with output (M, N); BN's channel is column n. Column n of
  op(B) is scaled by a[n] (a column of B when transB=0, a row when transB=1), and
  C' = a·(beta·C) + b with beta' = 1; C broadcasts (scalar, (N,), (1,N), (M,1), (M,N)) and the
  result has the broadcast shape; an absent C counts as 0. transA does not matter.
- MatMul, A @ B with B a constant (K, N): only when the output is 2-D (M, N), since BN's channel
  axis is 1 and MatMul's columns are its last axis. B' = B·a[None, :], then an Add of b, because
  MatMul has no bias input.

A fold needs: the producer in the BN's graph, its output read by the BN only and not a graph output,
its weight (and bias or C) constant. Otherwise the BN is left, without a note, for
DecomposeBatchNormPass. Declines that decomposing cannot fix either are noted: training_mode=1, a
statistics output in use, parameters that are not constant per-channel vectors.

Math in float64; new weights keep their dtype and are new initializers (the old ones may be shared);
what becomes unused is left to RemoveUnusedNodesPass. The BN's output name survives: the value that
replaces it takes the name when it is a graph output. Covers the main graph and subgraphs, not
model-local functions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from qcompile.graph.notes import add_note, notes
from qcompile.graph.queries import constant_array

_EPSILON_DEFAULT = 1e-5  # ONNX BatchNormalization, all opsets
_PARAM_NAMES = ("scale", "B", "input_mean", "input_var")


class FoldBatchNormPass(ir.passes.InPlacePass):
    """Fold BatchNormalization into a preceding Conv, ConvTranspose, Gemm or MatMul."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        names = names_in_use(model.graph)
        modified = False
        for bn in batchnorm_nodes(model):
            reason = batchnorm_decline_reason(bn)
            if reason is not None:
                note_batchnorm_kept(model, bn, reason)
                continue
            producer = _sole_producer(bn)
            fold = _folder(producer)
            if fold is None:
                continue
            # A folder checks everything before it edits, and returns None when it declines.
            replacement = fold(producer, batchnorm_affine(bn), names)
            if replacement is None:
                continue
            take_over_output(bn, replacement)
            modified = True
        return ir.passes.PassResult(model, modified=modified)


# --- The BatchNormalization rule, shared with DecomposeBatchNormPass --------------------------


@dataclass(frozen=True)
class ChannelAffine:
    """y = scale[c]·x + shift[c] for channel c (axis 1), in float64."""

    scale: np.ndarray
    shift: np.ndarray


def batchnorm_nodes(model: ir.Model) -> list[ir.Node]:
    # A list: the passes remove nodes, which the recursive iterator does not allow mid-walk.
    return [
        n for n in model.graph.all_nodes() if n.op_type == "BatchNormalization" and n.domain in ("", "ai.onnx")
    ]


def batchnorm_decline_reason(bn: ir.Node) -> str | None:
    """Why this BN cannot be rewritten as a per-channel affine map, or None when it can."""
    if bn.attributes.get_int("training_mode", 0) != 0:
        return "training_mode=1: it normalizes with batch statistics, not constants"
    if any(out.uses() or out.is_graph_output() for out in bn.outputs[1:]):
        return "its running/saved statistics outputs are used"
    params = bn.inputs[1:5]
    if len(params) != 4 or any(v is None for v in params):
        return "it does not have the four parameter inputs (scale, B, input_mean, input_var)"
    arrays = [constant_array(v) for v in params]
    for name, value, array in zip(_PARAM_NAMES, params, arrays):
        if array is None:
            return f"its {name} input {value.name!r} is not a constant"
    if any(a.ndim != 1 or a.shape != arrays[0].shape for a in arrays):
        return "its parameters are not per-channel vectors of one length (spatial=0?)"
    return None


def batchnorm_affine(bn: ir.Node) -> ChannelAffine:
    """a = γ / sqrt(σ² + ε), b = β - a·μ; call after batchnorm_decline_reason returned None."""
    gamma, beta, mean, var = (constant_array(v).astype(np.float64) for v in bn.inputs[1:5])
    epsilon = bn.attributes.get_float("epsilon", _EPSILON_DEFAULT)
    scale = gamma / np.sqrt(var + epsilon)
    return ChannelAffine(scale=scale, shift=beta - scale * mean)


def note_batchnorm_kept(model: ir.Model, bn: ir.Node, reason: str) -> None:
    # Both BN passes see the same BN; the same words once are enough for the report.
    text = f"BatchNormalization {bn.name or bn.outputs[0].name!r} kept: {reason}"
    if text not in notes(model):
        add_note(model, text)


def take_over_output(bn: ir.Node, new: ir.Value) -> None:
    """Make ``new`` stand for the BN's output and remove the BN.

    ``new`` is an internal value of the BN's graph that only the BN read or that the pass just made,
    so it takes the BN output's name: a graph output must keep it, and a tensor name keeps one
    meaning across the float and compiled models (per-layer comparisons match tensors by name; the
    producer's old name, which meant the value before normalization, disappears).
    """
    old = bn.outputs[0]
    name = old.name
    if new.type is None:
        new.type = old.type
    if new.shape is None:
        new.shape = old.shape
    old.replace_all_uses_with(new, replace_graph_outputs=True)
    bn.graph.remove(bn, safe=True)
    if name:
        new.name = name


def _fresh_name(names: set[str], base: str) -> str:
    name, i = base, 1
    while name in names:
        name, i = f"{base}_{i}", i + 1
    names.add(name)
    return name


def names_in_use(graph: ir.Graph) -> set[str]:
    """Every value name in the graph and its subgraphs (ONNX names are unique across scopes)."""
    names: set[str] = set()
    for g in (graph, *graph.subgraphs()):
        names.update(v.name for v in g.inputs)
        names.update(g.initializers)
        for node in g:
            names.update(v.name for v in node.outputs)
    return names


def add_initializer(graph: ir.Graph, names: set[str], base: str, array: np.ndarray) -> ir.Value:
    """A new initializer named ``base`` (or ``base_1``, ... when taken)."""
    name = _fresh_name(names, base)
    value = ir.Value(
        name=name,
        type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
        shape=ir.Shape(array.shape),
        const_value=ir.tensor(array, name=name),
    )
    graph.register_initializer(value)
    return value


# --- Producers --------------------------------------------------------------------------------


def _sole_producer(bn: ir.Node) -> ir.Node | None:
    """The node whose output only this BN reads, in the BN's graph; None when there is none."""
    x = bn.inputs[0]
    producer = x.producer() if x is not None else None
    if producer is None or producer.graph is not bn.graph or x.is_graph_output():
        return None
    if len(x.uses()) != 1 or x.index() != 0:
        return None
    return producer


def _folder(producer: ir.Node | None) -> Callable[[ir.Node, ChannelAffine, set[str]], ir.Value | None] | None:
    if producer is None or producer.domain not in ("", "ai.onnx"):
        return None
    return _FOLDERS.get(producer.op_type)


def _input(node: ir.Node, index: int) -> ir.Value | None:
    return node.inputs[index] if index < len(node.inputs) else None


def _set_input(node: ir.Node, index: int, value: ir.Value) -> None:
    if index >= len(node.inputs):
        node.resize_inputs(index + 1)
    node.replace_input_with(index, value)


def _optional_constant(value: ir.Value | None, default: np.ndarray) -> np.ndarray | None:
    """An optional input's data: ``default`` when absent, None when present but not constant."""
    return default if value is None else constant_array(value)


def _fold_conv_like(
    node: ir.Node, affine: ChannelAffine, names: set[str], *, transposed: bool
) -> ir.Value | None:
    weight = constant_array(node.inputs[1])
    channels = affine.scale.shape[0]
    if weight is None or weight.ndim < 2:
        return None
    bias = _optional_constant(_input(node, 2), np.zeros(channels, weight.dtype))
    if bias is None or bias.shape != (channels,):
        return None
    w = weight.astype(np.float64)
    kernel_ones = (1,) * (weight.ndim - 2)
    if transposed:
        group = node.attributes.get_int("group", 1)
        c_in, c_out_per_group = weight.shape[0], weight.shape[1]
        if c_in % group != 0 or group * c_out_per_group != channels:
            return None
        grouped = w.reshape(group, c_in // group, c_out_per_group, *weight.shape[2:])
        a = affine.scale.reshape(group, 1, c_out_per_group, *kernel_ones)
        new_w = (grouped * a).reshape(weight.shape)
    else:
        if weight.shape[0] != channels:
            return None
        new_w = w * affine.scale.reshape(channels, 1, *kernel_ones)
    new_b = affine.scale * bias.astype(np.float64) + affine.shift
    base = node.outputs[0].name or node.op_type
    _set_input(node, 1, add_initializer(node.graph, names, f"{base}_bn_weight", new_w.astype(weight.dtype)))
    _set_input(node, 2, add_initializer(node.graph, names, f"{base}_bn_bias", new_b.astype(bias.dtype)))
    return node.outputs[0]


def _fold_conv(node: ir.Node, affine: ChannelAffine, names: set[str]) -> ir.Value | None:
    return _fold_conv_like(node, affine, names, transposed=False)


def _fold_conv_transpose(node: ir.Node, affine: ChannelAffine, names: set[str]) -> ir.Value | None:
    return _fold_conv_like(node, affine, names, transposed=True)


def _fold_gemm(node: ir.Node, affine: ChannelAffine, names: set[str]) -> ir.Value | None:
    b_matrix = constant_array(node.inputs[1])
    if b_matrix is None or b_matrix.ndim != 2:
        return None
    trans_b = node.attributes.get_int("transB", 0) != 0
    columns = b_matrix.shape[0] if trans_b else b_matrix.shape[1]
    if columns != affine.scale.shape[0]:
        return None
    c = _optional_constant(_input(node, 2), np.zeros((), b_matrix.dtype))
    # C broadcasts unidirectionally to (M, N): at most 2-D, its last axis 1 or N.
    if c is None or c.ndim > 2 or (c.ndim > 0 and c.shape[-1] not in (1, columns)):
        return None
    a = affine.scale[:, None] if trans_b else affine.scale[None, :]
    new_b_matrix = (b_matrix.astype(np.float64) * a).astype(b_matrix.dtype)
    # beta·C folds into C' so that beta' = 1 is exact whatever beta was (0 included).
    beta = node.attributes.get_float("beta", 1.0)
    new_c = affine.scale * (beta * c.astype(np.float64)) + affine.shift
    base = node.outputs[0].name or node.op_type
    _set_input(node, 1, add_initializer(node.graph, names, f"{base}_bn_weight", new_b_matrix))
    _set_input(node, 2, add_initializer(node.graph, names, f"{base}_bn_bias", new_c.astype(c.dtype)))
    node.attributes["beta"] = ir.AttrFloat32("beta", 1.0)
    return node.outputs[0]


def _fold_matmul(node: ir.Node, affine: ChannelAffine, names: set[str]) -> ir.Value | None:
    b_matrix = constant_array(node.inputs[1])
    if b_matrix is None or b_matrix.ndim != 2 or b_matrix.shape[1] != affine.scale.shape[0]:
        return None
    # With a 2-D B the output has A's rank; BN's channel axis 1 is the last axis only at rank 2.
    known = [v.shape for v in (node.outputs[0], node.inputs[0]) if v.shape is not None]
    if not known or known[0].rank() != 2:
        return None
    base = node.outputs[0].name or node.op_type
    # The MatMul now computes a scaled product: its old name would mean something else.
    node.outputs[0].name = _fresh_name(names, f"{base}_bn_scaled")
    new_b_matrix = (b_matrix.astype(np.float64) * affine.scale[None, :]).astype(b_matrix.dtype)
    _set_input(node, 1, add_initializer(node.graph, names, f"{base}_bn_weight", new_b_matrix))
    bias = add_initializer(node.graph, names, f"{base}_bn_bias", affine.shift.astype(b_matrix.dtype))
    add = ir.node("Add", [node.outputs[0], bias])
    add.outputs[0].type = node.outputs[0].type
    add.outputs[0].shape = node.outputs[0].shape
    node.graph.insert_after(node, add)
    return add.outputs[0]


# Which producers fold, as data: op type → folder.
_FOLDERS: dict[str, Callable[[ir.Node, ChannelAffine, set[str]], ir.Value | None]] = {
    "Conv": _fold_conv,
    "ConvTranspose": _fold_conv_transpose,
    "Gemm": _fold_gemm,
    "MatMul": _fold_matmul,
}
