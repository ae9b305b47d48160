"""EqualizeCrossLayerPass: balance the per-channel weight ranges of consecutive layers (float rewrite).

Cross-layer equalization (Nagel et al., "Data-Free Quantization", 2019). For a chain
layer 1 → f → layer 2, where f is positive-homogeneous per channel (f(x/s) = f(x)/s for s > 0:
Relu, LeakyRelu, PRelu, MaxPool, or nothing), scaling output channel i of layer 1 by 1/s_i and
input channel i of layer 2 by s_i leaves the chain's output unchanged:

    W1'[i] = W1[i] / s_i,   b1'[i] = b1[i] / s_i,   W2'[:, i] = W2[:, i] · s_i.

With r1_i = max |W1[i]| (layer 1's range of output channel i) and r2_i = max |W2[:, i]| (layer 2's
range over everything input channel i touches), s_i = sqrt(r1_i / r2_i) makes both ranges
sqrt(r1_i · r2_i): r1_i / s_i = r2_i · s_i. A channel with r1_i = 0 or r2_i = 0 keeps s_i = 1.
Chains share layers (layer 2 of one is layer 1 of the next), so the pass repeats over all chains
until no scale moves by more than ``TOLERANCE`` (at most ``MAX_ROUNDS`` rounds).

Layers: Conv (any ``group``; a grouped layer 2's input channel c is weight index c mod C_in/group
of the output channels of group c div (C_in/group), which covers depthwise 1:1), Gemm (transA=0;
its bias C broadcast to a per-column vector) and MatMul with a constant 2-D weight, optionally
followed by an Add of a constant per-column bias. Conv pairs with Conv; Gemm/MatMul with
Gemm/MatMul (the channel is the last axis).

Declined, each with a note: an activation that is not positive-homogeneous (Clip/ReLU6 clips at a
fixed value, so it does not commute with a scale; most MobileNetV2 pairs), an intermediate tensor
with another reader or that is a graph output, a shared or non-float weight. Only the main graph.
Run after BatchNormalization folding (a BN between the layers would block the chain) and before
anything is quantized.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from qcompile.graph.notes import add_note
from qcompile.graph.queries import constant_array

MAX_ROUNDS = 20
# Stop when every |log s_i| of a round is below this (a relative change of 0.1 %).
TOLERANCE = 1e-3
# Ops between the layers that commute with a positive per-channel scale.
_HOMOGENEOUS = ("Relu", "LeakyRelu", "PRelu", "MaxPool")
_CONV_FAMILY = ("Conv",)
_DENSE_FAMILY = ("Gemm", "MatMul")
_FLOATS = (ir.DataType.FLOAT, ir.DataType.DOUBLE, ir.DataType.FLOAT16)


@dataclass
class _Chain:
    first: ir.Node
    between: list[str]  # op types of the nodes between the layers
    second: ir.Node
    first_bias: ir.Value | None  # layer 1's bias: Conv B, Gemm C, or the constant of a following Add
    scales: np.ndarray | None = None  # accumulated s over the rounds

    def describe(self) -> str:
        return " → ".join([f"{self.first.op_type} {self.first.name!r}", *self.between, f"{self.second.op_type} {self.second.name!r}"])


class EqualizeCrossLayerPass(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        chains = []
        for node in list(model.graph):
            chain_or_reason = _find_chain(node)
            if isinstance(chain_or_reason, _Chain):
                chains.append(chain_or_reason)
            elif chain_or_reason is not None:
                add_note(model, f"equalize_cross_layer: declined {chain_or_reason}")
        if not chains:
            return ir.passes.PassResult(model, modified=False)
        rounds = 0
        for rounds in range(1, MAX_ROUNDS + 1):
            largest = 0.0
            for chain in chains:
                scales = _equalize(chain)
                chain.scales = scales if chain.scales is None else chain.scales * scales
                largest = max(largest, float(np.max(np.abs(np.log(scales)))))
            if largest < TOLERANCE:
                break
        for chain in chains:
            s = chain.scales
            add_note(
                model,
                f"equalize_cross_layer: equalized {chain.describe()}: {len(s)} channels, "
                f"scales {float(s.min()):.3g}–{float(s.max()):.3g}",
            )
        add_note(model, f"equalize_cross_layer: {len(chains)} chains in {rounds} rounds")
        return ir.passes.PassResult(model, modified=True)


# --- Finding chains ---------------------------------------------------------------------------


def _weight(node: ir.Node) -> np.ndarray | None:
    return constant_array(node.inputs[1]) if len(node.inputs) > 1 else None


def _is_layer(node: ir.Node) -> bool:
    if node.domain not in ("", "ai.onnx") or node.op_type not in _CONV_FAMILY + _DENSE_FAMILY:
        return False
    weight = _weight(node)
    if weight is None:
        return False
    if node.op_type == "Conv":
        return weight.ndim >= 3
    if node.op_type == "Gemm":
        return weight.ndim == 2 and node.attributes.get_int("transA", 0) == 0
    return weight.ndim == 2


def _family(node: ir.Node) -> tuple[str, ...]:
    return _CONV_FAMILY if node.op_type in _CONV_FAMILY else _DENSE_FAMILY


def _sole_reader(value: ir.Value) -> tuple[ir.Node | None, str | None]:
    """The one node reading ``value``, or a reason why there is not exactly one."""
    if value.is_graph_output():
        return None, f"its output {value.name!r} is a graph output"
    uses = value.uses()
    if len(uses) != 1:
        return None, f"its output {value.name!r} has {len(uses)} readers" if uses else None
    return uses[0].node, None


def _matmul_bias(node: ir.Node, reader: ir.Node, channels: int) -> ir.Value | None:
    """The constant operand of an Add after a MatMul when it is a per-column bias."""
    if reader.op_type != "Add" or len(reader.inputs) != 2:
        return None
    other = reader.inputs[1] if reader.inputs[0] is node.outputs[0] else reader.inputs[0]
    data = constant_array(other)
    if data is None or data.ndim != 1 or data.shape[0] != channels:
        return None
    return other


def _find_chain(node: ir.Node) -> _Chain | str | None:
    """The chain starting at layer ``node``; a reason when one is blocked; None when there is none."""
    if not _is_layer(node):
        return None
    first_text = f"{node.op_type} {node.name!r}"
    weight = _weight(node)
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    value = node.outputs[0]
    reader, reason = _sole_reader(value)
    if node.op_type == "MatMul" and reader is not None:
        matmul_bias = _matmul_bias(node, reader, weight.shape[1])
        if matmul_bias is not None:
            bias, value = matmul_bias, reader.outputs[0]
            reader, reason = _sole_reader(value)
    between: list[str] = []
    while reader is not None and reader.op_type in _HOMOGENEOUS and reader.domain in ("", "ai.onnx"):
        if reader.op_type == "MaxPool" and any(o.uses() or o.is_graph_output() for o in reader.outputs[1:]):
            return None  # MaxPool's Indices in use: not a plain chain
        between.append(reader.op_type)
        value = reader.outputs[0]
        reader, reason = _sole_reader(value)
    if reader is None:
        if reason is None:
            return None
        follower = _layer_after(value)
        return f"{' → '.join([first_text, *between, follower])}: {reason}" if follower else None
    if not _is_layer(reader) or reader.inputs[0] is not value or _family(reader) != _family(node):
        if reader.op_type == "Clip" and _layer_after(reader.outputs[0]):
            return (
                f"{' → '.join([first_text, *between, 'Clip', _layer_after(reader.outputs[0])])}: Clip (ReLU6) is not "
                "positive-homogeneous, min(x/s, 6) ≠ min(x, 6)/s"
            )
        return None
    chain = _Chain(node, between, reader, bias)
    problem = _chain_problem(chain, weight)
    if problem is not None:
        return f"{chain.describe()}: {problem}"
    return chain


def _layer_after(value: ir.Value) -> str | None:
    """A layer reading ``value`` directly or through homogeneous ops (for the words of a note)."""
    for use in value.uses():
        reader = use.node
        if _is_layer(reader) and use.idx == 0:
            return f"{reader.op_type} {reader.name!r}"
        if reader.op_type in _HOMOGENEOUS:
            found = _layer_after(reader.outputs[0])
            if found:
                return found
    return None


def _chain_problem(chain: _Chain, weight1: np.ndarray) -> str | None:
    for layer in (chain.first, chain.second):
        w = layer.inputs[1]
        if len(w.uses()) != 1:
            return f"the weight {w.name!r} of {layer.name!r} is shared with another node"
        if w.dtype not in _FLOATS:
            return f"the weight of {layer.name!r} is not float"
    if chain.first_bias is not None:
        if constant_array(chain.first_bias) is None:
            return f"the bias of {chain.first.name!r} is not a constant"
        if len(chain.first_bias.uses()) != 1:
            return f"the bias {chain.first_bias.name!r} of {chain.first.name!r} is shared with another node"
    channels = _output_channels(chain.first, weight1)
    if chain.first.op_type == "Gemm" and chain.first_bias is not None:
        c = constant_array(chain.first_bias)
        if c.ndim > 2 or (c.ndim > 0 and c.shape[-1] not in (1, channels)):
            return "layer 1's C does not broadcast per column"
    if _input_channels(chain.second, _weight(chain.second)) != channels:
        return "the layers' channel counts differ"
    return None


# --- Ranges and scaling ----------------------------------------------------------------------


def _output_channels(node: ir.Node, w: np.ndarray) -> int:
    if node.op_type == "Conv":
        return w.shape[0]
    if node.op_type == "Gemm" and node.attributes.get_int("transB", 0):
        return w.shape[0]
    return w.shape[1]


def _input_channels(node: ir.Node, w: np.ndarray) -> int:
    if node.op_type == "Conv":
        return w.shape[1] * node.attributes.get_int("group", 1)
    if node.op_type == "Gemm" and node.attributes.get_int("transB", 0):
        return w.shape[1]
    return w.shape[0]


def _rows_out(node: ir.Node, w: np.ndarray) -> np.ndarray:
    """Layer 1's weight as (output channels, everything else)."""
    if node.op_type == "Conv" or (node.op_type == "Gemm" and node.attributes.get_int("transB", 0)):
        return w.reshape(w.shape[0], -1)
    return w.T


def _input_ranges(node: ir.Node, w: np.ndarray) -> np.ndarray:
    """max |W2| over everything input channel c touches, for each c."""
    if node.op_type != "Conv":
        transposed = node.op_type == "Gemm" and node.attributes.get_int("transB", 0)
        return np.abs(w).max(axis=0 if transposed else 1)
    group = node.attributes.get_int("group", 1)
    per_group_in = w.shape[1]
    magnitude = np.abs(w).reshape(w.shape[0], per_group_in, -1).max(axis=2)  # (C_out, C_in/group)
    return magnitude.reshape(group, w.shape[0] // group, per_group_in).max(axis=1).reshape(-1)


def _scale_inputs(node: ir.Node, w: np.ndarray, s: np.ndarray) -> np.ndarray:
    """W2 with input channel c multiplied by s[c]."""
    if node.op_type != "Conv":
        transposed = node.op_type == "Gemm" and node.attributes.get_int("transB", 0)
        return w * (s[None, :] if transposed else s[:, None])
    group = node.attributes.get_int("group", 1)
    per_group_in = w.shape[1]
    # Output channel o of group o div (C_out/group) reads input channel (group of o)·per_group_in + j.
    per_output = s.reshape(group, 1, per_group_in).repeat(w.shape[0] // group, axis=1).reshape(w.shape[0], per_group_in)
    return w * per_output.reshape(per_output.shape + (1,) * (w.ndim - 2))


def _scale_outputs(node: ir.Node, w: np.ndarray, s: np.ndarray) -> np.ndarray:
    """W1 with output channel i divided by s[i]."""
    if node.op_type == "Conv" or (node.op_type == "Gemm" and node.attributes.get_int("transB", 0)):
        return w / s.reshape((-1,) + (1,) * (w.ndim - 1))
    return w / s[None, :]


def _set_constant(value: ir.Value, array: np.ndarray, dtype: np.dtype) -> None:
    value.const_value = ir.tensor(array.astype(dtype), name=value.name)
    value.shape = ir.Shape(array.shape)


def _equalize(chain: _Chain) -> np.ndarray:
    """One equalization of the chain's channels; returns the scales applied."""
    w1_value, w2_value = chain.first.inputs[1], chain.second.inputs[1]
    w1_raw, w2_raw = constant_array(w1_value), constant_array(w2_value)
    w1, w2 = w1_raw.astype(np.float64), w2_raw.astype(np.float64)
    r1 = np.abs(_rows_out(chain.first, w1)).max(axis=1)
    r2 = _input_ranges(chain.second, w2)
    usable = (r1 > 0) & (r2 > 0)
    s = np.ones_like(r1)
    s[usable] = np.sqrt(r1[usable] / r2[usable])
    _set_constant(w1_value, _scale_outputs(chain.first, w1, s), w1_raw.dtype)
    _set_constant(w2_value, _scale_inputs(chain.second, w2, s), w2_raw.dtype)
    if chain.first_bias is not None:
        bias_raw = constant_array(chain.first_bias)
        bias = bias_raw.astype(np.float64)
        if bias.ndim == 0 or bias.shape[-1] != len(s):
            bias = np.broadcast_to(bias, bias.shape[:-1] + (len(s),) if bias.ndim else (len(s),))
        _set_constant(chain.first_bias, bias / s, bias_raw.dtype)
    return s
