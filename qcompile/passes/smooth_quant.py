"""SmoothQuantPass: move activation outlier channels into the weights of the MatMul/Gemm that read them.

For ``Y = X W`` (X: (..., K), W: (K, N)), with a per-input-channel factor s_k > 0,

    Y = (X diag(1/s)) (diag(s) W),

exact in real arithmetic. Channels of X far larger than the rest (LayerNorm outputs of transformers)
set the per-tensor activation scale and leave the other channels a few int8 levels; dividing them by
s_k and multiplying weight row k by s_k (the weight is quantized per output column, so it absorbs
this better) balances the two. Following SmoothQuant (Xiao et al., 2022):

    s_k = max|X_k|^α / max|W_k|^(1−α)

where max|W_k| is taken over row k of every weight in the group (the MatMul/Gemm reading X with a
constant weight: Q, K and V share one input). α is chosen per group from ``SmoothQuantOptions.alphas``
by the smallest simulated quantized output error on a reservoir sample of calibration rows of X, and
a group is smoothed only when that error is at least ``min_gain`` below the unsmoothed one: that
search, a function of the statistics, weights and options alone, is ``calibration/smoothing``
(``choose_smoothing``). This module finds the groups and rewrites the graph.

The statistics cost one pass over the calibration data (``statistics``, called only for groups
without a decision). Decisions passed in (``decisions``: the calibration cache's, made for this
model, data and options) are applied as they are, without statistics; ``self.decisions`` holds every
group's decision after the run, for the cache to store.

Where 1/s goes: into the scale and bias of the LayerNormalization that makes X when only the group
reads X (exact: LN(x)·γ/s + β/s); otherwise into a new float Mul by a constant (pinned float: an
int8 Mul would quantize X with its outliers). Declined, with a note: X made by an int8 op (its
output's qparams are fused into that kernel); a weight also read elsewhere or a graph output; a
Gemm with transA or non-unit alpha; a batched (rank > 2) MatMul weight.

Precondition: AnnotatePass has run (which ops run int8). The caller re-runs it after a change.
MiniLM (all-MiniLM-L6-v2): every one of its 24 groups is smoothed; mean embedding cosine to float
0.9921 → 0.9979.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from qcompile.calibration.channel_stats import ChannelStats
from qcompile.calibration.smoothing import SmoothDecision, choose_smoothing
from qcompile.graph.names import FreshNames
from qcompile.graph.notes import add_note
from qcompile.graph.queries import constant_array
from qcompile.passes.op_rules import OpKind, rule_for
from qcompile.options import CalibrationMethod, CalibrationOptions, SchemeOptions, SmoothQuantOptions
from qcompile.quant.spec import DECISION_KEY, FLOAT_REASON_KEY, RANGE_METHOD_KEY

SMOOTHING_MUL = "a SmoothQuant scale: an int8 Mul would quantize its input with the outliers it removes"


@dataclass
class SmoothGroup:
    """The MatMul/Gemm nodes reading one activation ``x`` with a constant weight."""

    x: ir.Value
    nodes: list[ir.Node]
    weights: list[ir.Value]  # one per node
    transposed: list[bool]  # weight stored (N, K) (Gemm transB=1)

    def weight_rows(self, j: int) -> np.ndarray:
        """Weight j as (K, N)."""
        data = constant_array(self.weights[j]).astype(np.float32)
        return data.T if self.transposed[j] else data

    @property
    def channels(self) -> int:
        """K: the channels of x."""
        shape = constant_array(self.weights[0]).shape
        return int(shape[1] if self.transposed[0] else shape[0])


Statistics = Callable[[list[str]], dict[str, ChannelStats]]


def _runs_int8(node: ir.Node | None) -> bool:
    decision = None if node is None else node.meta.get(DECISION_KEY)
    return decision is not None and decision.quantized


def _reader(node: ir.Node, x: ir.Value) -> tuple[ir.Value, bool] | str | None:
    """(weight, transposed) if ``node`` is a quantized MatMul/Gemm reading ``x`` times a constant
    weight; a reason if it is one that cannot be smoothed; None if it is no such reader."""
    if node.op_type not in ("MatMul", "Gemm") or node.domain not in ("", "ai.onnx") or not _runs_int8(node):
        return None
    if len(node.inputs) < 2 or node.inputs[0] is not x or node.inputs[1] is None:
        return None
    weight = node.inputs[1]
    data = constant_array(weight)
    if data is None or weight.dtype != ir.DataType.FLOAT:
        return None
    transposed = False
    if node.op_type == "Gemm":
        attrs = {k: a.value for k, a in node.attributes.items()}
        if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0:
            return f"{node.name}: a Gemm with transA or alpha != 1"
        transposed = bool(attrs.get("transB", 0))
    if data.ndim != 2:
        return f"{node.name}: its weight has rank {data.ndim}, not 2"
    if weight.is_graph_output() or len(weight.uses()) != 1:
        return f"{node.name}: its weight {weight.name!r} is also read elsewhere or a graph output"
    return weight, transposed


def _int8_anchor(x: ir.Value) -> ir.Node | None:
    """The int8 op that makes ``x`` and stays int8 whatever reads it, or None.

    Add/Mul, data movement and Relu/Clip run int8 only for an int8 reader (annotation rule 3): behind
    a float smoothing Mul they return to float, as does the output of a MatMul/Gemm (its int8 kernel
    returns float). Conv, pooling, Concat or a lookup keep their int8 output: a float Mul after them
    would add a dequantize-Mul-quantize round trip, so those tensors are declined.
    """
    stack, seen = [x], set()
    while stack:
        value = stack.pop()
        node = value.producer()
        if node is None or node in seen or not _runs_int8(node):
            continue
        seen.add(node)
        rule = rule_for(node.op_type, node.domain)
        if rule is None:
            return node
        if rule.kind in (OpKind.ELEMENTWISE, OpKind.SHARED, OpKind.FUSABLE_ACTIVATION):
            stack.extend(v for v in node.inputs if v is not None and constant_array(v) is None)
        elif not (rule.kind == OpKind.COMPUTE and rule.float_output_ok):
            return node
    return None


def find_groups(model: ir.Model) -> tuple[list[SmoothGroup], list[str]]:
    """Candidate groups in graph order, and the reasons of the ones declined for their structure."""
    groups, declined = [], []
    values = list(model.graph.inputs) + [out for node in model.graph for out in node.outputs]
    for x in values:
        if x.dtype != ir.DataType.FLOAT:
            continue
        readers = [(use.node, _reader(use.node, x)) for use in x.uses()]
        found = [(node, r) for node, r in readers if isinstance(r, tuple)]
        reasons = [r for _, r in readers if isinstance(r, str)]
        if not found and not reasons:
            continue
        anchor = _int8_anchor(x)
        if anchor is not None:
            declined.append(f"{x.name!r} is made by the int8 op {anchor.name}")
        elif reasons:
            declined.append(f"{x.name!r}: {'; '.join(reasons)}")
        else:
            nodes = [node for node, _ in found]
            groups.append(SmoothGroup(x, nodes, [r[0] for _, r in found], [r[1] for _, r in found]))
    return groups, declined


class SmoothQuantPass(ir.passes.InPlacePass):
    def __init__(
        self,
        options: SmoothQuantOptions,
        scheme: SchemeOptions,
        calibration: CalibrationOptions,
        statistics: Statistics,
        decisions: Mapping[str, SmoothDecision] | None = None,
    ) -> None:
        super().__init__()
        self.options = options
        self.scheme = scheme
        self.calibration = calibration
        # Names of the tensors to smooth → their statistics (one pass over the calibration data).
        self.statistics = statistics
        # Tensor name → decision: the ones given, then the ones this pass makes (named in ``computed``).
        self.decisions: dict[str, SmoothDecision] = dict(decisions or {})
        self.computed: list[str] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        groups, declined = find_groups(model)
        for reason in declined:
            add_note(model, f"smooth_quant declined: {reason}")
        if not groups:
            return ir.passes.PassResult(model, modified=False)
        missing = [g for g in groups if not _fits(self.decisions.get(g.x.name), g)]
        self.computed = [g.x.name for g in missing]
        if missing:
            stats = self.statistics([g.x.name for g in missing])
            for group in missing:
                weights = [group.weight_rows(j) for j in range(len(group.nodes))]
                self.decisions[group.x.name] = choose_smoothing(
                    stats[group.x.name], weights, self.options, self.scheme, self.calibration
                )
        names = FreshNames(model.graph)
        modified = False
        for group in groups:
            modified |= self._smooth(model, group, self.decisions[group.x.name], names)
        return ir.passes.PassResult(model, modified=modified)

    def _smooth(self, model: ir.Model, group: SmoothGroup, decision: SmoothDecision, names: FreshNames) -> bool:
        what = f"{group.x.name!r} ({len(group.nodes)} {'/'.join(sorted({n.op_type for n in group.nodes}))})"
        if decision.factors is None:
            add_note(
                model,
                f"smooth_quant declined: {what}: no α lowers the simulated error by {self.options.min_gain:.0%} "
                f"(best {decision.gain:.0%})",
            )
            return False
        where = self._apply(model, group, decision.factors, decision.method, names)
        add_note(
            model,
            f"smooth_quant: {what}, α={decision.alpha:g}, range by {decision.method.value}: simulated output error "
            f"{decision.baseline:.2e} → {decision.error:.2e}; 1/s {where}",
        )
        return True

    def _apply(self, model: ir.Model, group: SmoothGroup, s: np.ndarray, method: CalibrationMethod, names: FreshNames) -> str:
        for j, weight in enumerate(group.weights):
            data = constant_array(weight).astype(np.float32)
            scaled = data * (s[None, :] if group.transposed[j] else s[:, None])
            weight.const_value = ir.tensor(scaled.astype(np.float32), name=weight.name)
        inverse = (1.0 / s).astype(np.float32)
        if method != self.calibration.method:
            group.x.meta[RANGE_METHOD_KEY] = method  # the LN output, or carried to the Mul's below
        if _fold_into_layernorm(group, inverse):
            return f"folded into {group.x.producer().name}"
        graph = model.graph
        name = names(f"{group.x.name}_smooth")
        factor = ir.Value(name=names(f"{name}_scale"), const_value=ir.tensor(inverse))
        factor.dtype, factor.shape = ir.DataType.FLOAT, ir.Shape(inverse.shape)
        graph.register_initializer(factor)
        mul = ir.node("Mul", [group.x, factor], outputs=[ir.Value(name=name)], name=name)
        mul.outputs[0].dtype, mul.outputs[0].shape = group.x.dtype, group.x.shape
        # In the node's metadata_props, not its meta: the decision survives a proto round trip (the
        # precision search rebuilds candidates from the smoothed float model's proto).
        mul.metadata_props[FLOAT_REASON_KEY] = SMOOTHING_MUL
        if RANGE_METHOD_KEY in group.x.meta:
            mul.outputs[0].meta[RANGE_METHOD_KEY] = group.x.meta.pop(RANGE_METHOD_KEY)
        producer = group.x.producer()
        if producer is None:  # a graph input: the Mul goes first
            graph.insert_before(graph.node(0), mul)
        else:
            graph.insert_after(producer, mul)
        for node in group.nodes:
            node.replace_input_with(0, mul.outputs[0])
        return f"in a new float Mul {name}"


def _fits(decision: SmoothDecision | None, group: SmoothGroup) -> bool:
    """A decision given for the group's tensor applies to it: one factor per channel."""
    return decision is not None and (decision.factors is None or decision.factors.shape == (group.channels,))


def _fold_into_layernorm(group: SmoothGroup, inverse: np.ndarray) -> bool:
    """Scale γ and β of the LayerNormalization making ``x`` by 1/s, when only the group reads x."""
    ln = group.x.producer()
    if ln is None or ln.op_type != "LayerNormalization" or ln.domain not in ("", "ai.onnx"):
        return False
    if group.x.is_graph_output() or {use.node for use in group.x.uses()} != set(group.nodes) or ln.outputs[0] is not group.x:
        return False
    params = [v for v in ln.inputs[1:3] if v is not None]
    arrays = [constant_array(v) for v in params]
    if any(a is None or a.shape != inverse.shape or len(v.uses()) != 1 or v.is_graph_output() for v, a in zip(params, arrays)):
        return False  # not (K,) constants of this LN alone (γ of shape (K,): it normalizes the last axis)
    for value, array in zip(params, arrays):
        value.const_value = ir.tensor((array * inverse).astype(np.float32), name=value.name)
    return True
