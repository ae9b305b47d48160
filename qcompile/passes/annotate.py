"""AnnotatePass: decide what is quantized, writing a spec onto each tensor and a decision onto each node.

Rules (from ``op_rules``), applied in topological order:

1. A node whose op is not in the op table, is kept float by the user, or reads a non-float32 input
   stays float; its decision carries the reason, which the report prints.
2. COMPUTE / ELEMENTWISE / UNARY nodes are quantized: their activation inputs get an activation spec
   (a graph input or a float node's output becomes a float→int boundary), constant weights a
   symmetric int8 spec (per output channel by default), constant operands of Add/Mul a per-tensor
   spec of the activation type, and a constant 1-D bias a derived int32 spec. Two exceptions, both
   for speed on onnxruntime's CPU provider: an Add/Mul none of whose operands comes from an int8
   op stays float (a QuantizeLinear per operand costs more than the float op, and quantizing GELU's
   Add/Mul keeps onnxruntime from fusing it into one Gelu kernel); a Conv/Gemm/MatMul without a
   constant weight (attention's activation × activation MatMuls) stays float (each operand would need
   its own QuantizeLinear, and the int8 kernel measured slower than float on MiniLM).
3. SHARED (data movement) and FUSABLE_ACTIVATION (Relu, Clip) nodes are quantized only when their
   input is; CONCAT when any input is. ELEMENTWISE, SHARED and FUSABLE_ACTIVATION nodes are
   quantized only when some consumer runs in int8 (decided from the outputs back): otherwise
   quantizing them would only add a Q/DQ pair before float ops.
4. A quantized node's output is quantized, except (a) when its only consumer is a Relu/Clip that
   will be quantized (the activation's output carries the qparams: not between Conv and Relu), and
   (b) for ops whose int8 kernel can return float (Gemm, MatMul) when no consumer is quantized.
5. Tensors that must share qparams are put in one group: SHARED outputs with their input, Concat
   inputs with its output.

The target profile (``qcompile/targets.py``) narrows these rules as data: its ``quantized_ops``
(when set) are the only ops quantized, its ``placement`` OP_INPUTS quantizes inputs only (no output
Q/DQ; TensorRT), its ``int32_bias`` False leaves biases float, and its activation type and symmetry
replace the scheme's.

Precondition: shape inference has run (dtypes are known) and the graph is topologically sorted.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from qcompile.graph.queries import constant_array
from qcompile.options import ActivationDType, SchemeOptions, WeightGranularity
from qcompile.passes.op_rules import OpKind, OpRule, rule_for, weight_axis_for
from qcompile.quant.spec import (
    ANNOTATION_KEY,
    DECISION_KEY,
    FLOAT_REASON_KEY,
    NOT_FLOAT_DATA,
    ActivationAnnotation,
    BiasAnnotation,
    ConstantAnnotation,
    NodeDecision,
    QuantDType,
    QuantSpec,
    WeightAnnotation,
)
from qcompile.targets import CPU, QDQPlacement, TargetProfile

_DIRECT_KINDS = (OpKind.COMPUTE, OpKind.ELEMENTWISE, OpKind.UNARY)
ONLY_FLOAT_CONSUMERS = "its output feeds only float ops: quantizing it would only add Q/DQ work"
NO_INT8_OPERAND = (
    "no operand comes from an int8 op: a QuantizeLinear per operand costs more than the float op "
    "(and splits fusable float patterns such as GELU)"
)
ACTIVATION_MATMUL = (
    "a MatMul of two activations (as in attention), kept float by quantize_activation_matmuls=False: "
    "each operand would need its own QuantizeLinear, and onnxruntime's int8 kernel measured slower than float"
)
# A lookup table is stored in 8 bits for size; under this many float bytes the saving is small and
# its one per-tensor range costs accuracy (MiniLM's 768 KiB position table: 24.7 dB after the
# lookup; keeping it and the token-type table float: mean cosine 0.9979 -> 0.9981).
MIN_LOOKUP_TABLE_BYTES = 1 << 20



class _Groups:
    """Union-find over tensor names: tensors in one group share qparams."""

    def __init__(self) -> None:
        self._parent: dict[str, str] = {}

    def add(self, name: str) -> None:
        self._parent.setdefault(name, name)

    def find(self, name: str) -> str:
        root = name
        while self._parent[root] != root:
            root = self._parent[root]
        self._parent[name] = root
        return root

    def union(self, a: str, b: str) -> None:
        self.add(a)
        self.add(b)
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self._parent[rb] = ra

    def members(self) -> list[str]:
        return list(self._parent)


class AnnotatePass(ir.passes.InPlacePass):
    def __init__(
        self, scheme: SchemeOptions, profile: TargetProfile = CPU, float_reasons: Mapping[str, str] | None = None
    ) -> None:
        super().__init__()
        self.scheme = scheme
        self.profile = profile
        # From the precision policy (qcompile.precision.policy), which resolves keep_float, --precision
        # and the automatic assignment in one place: node name -> why it stays float. None: keep_float.
        self.float_reasons = None if float_reasons is None else dict(float_reasons)
        activation_dtype = profile.activation_dtype or scheme.activation_dtype
        dtype = QuantDType.UINT8 if activation_dtype == ActivationDType.UINT8 else QuantDType.INT8
        self._activation_spec = QuantSpec(dtype, symmetric=profile.activation_symmetric)

    # -- decisions ---------------------------------------------------------------------------

    def _kept_float_by_user(self, node: ir.Node) -> str | None:
        if self.float_reasons is not None:
            return self.float_reasons.get(node.name or "")
        for pattern in self.scheme.keep_float:
            if pattern == node.op_type or (node.name and fnmatch.fnmatchcase(node.name, pattern)):
                return f"kept float by keep_float {pattern!r}"
        return None

    def _static_reason(self, node: ir.Node) -> str | None:
        """Why a node can never be quantized, independent of its neighbours (None: it can)."""
        if not any(out.dtype == ir.DataType.FLOAT for out in node.outputs):
            return NOT_FLOAT_DATA
        if FLOAT_REASON_KEY in node.metadata_props:
            return node.metadata_props[FLOAT_REASON_KEY]
        rule = rule_for(node.op_type, node.domain)
        if rule is None:
            domain = f"{node.domain}::" if node.domain not in ("", "ai.onnx") else ""
            return f"op {domain}{node.op_type} is not in the op table"
        user = self._kept_float_by_user(node)
        if user:
            return user
        quantized_ops = self.profile.quantized_ops
        if quantized_ops is not None and node.op_type not in quantized_ops:
            return f"target {self.profile.name.value} quantizes only the inputs of {'/'.join(quantized_ops)}"
        if _is_table_lookup(node, min_bytes=0) and not _is_table_lookup(node):
            kib = node.inputs[0].const_value.nbytes / 1024
            return f"its lookup table holds {kib:.0f} KiB: too small to be worth 8 bits and a per-tensor range"
        if not self.scheme.quantize_activation_matmuls and _is_activation_matmul(node):
            return ACTIVATION_MATMUL
        if not rule.int8_kernel:
            return f"onnxruntime has no int8 {node.op_type} kernel: quantizing it would only add Q/DQ work"
        data = node.inputs[0] if node.inputs else None
        if data is None or data.dtype != ir.DataType.FLOAT:
            dtype = None if data is None else data.dtype
            return f"its data input is {dtype}, not float32"
        for value in node.inputs:  # e.g. a -inf attention mask; NaN weights in a damaged file
            array = constant_array(value)
            if array is not None and array.dtype.kind == "f" and not np.isfinite(array).all():
                return f"its constant input {value.name!r} holds NaN or Inf, which int8 cannot represent"
        return None

    def _wanted(self, graph: ir.Graph) -> dict[ir.Node, bool]:
        """Whether each node will run in int8, decided from its consumers back (rule 3).

        Ops with their own int8 kernel (COMPUTE, UNARY, CONCAT) are wanted whenever they can be
        quantized. Add/Mul, data movement and Relu/Clip are wanted only when some consumer is: an
        int8 op whose output only feeds float ops (a residual Add before LayerNormalization, the bias
        Add after a MatMul) would add a QuantizeLinear/DequantizeLinear pair and rounding for nothing.
        """
        wanted: dict[ir.Node, bool] = {}
        for node in reversed(list(graph)):
            rule = rule_for(node.op_type, node.domain)
            if rule is None or self._static_reason(node) is not None:
                wanted[node] = False
            elif rule.kind in (OpKind.COMPUTE, OpKind.UNARY, OpKind.CONCAT) or _is_table_lookup(node):
                wanted[node] = True
            elif rule.kind == OpKind.ELEMENTWISE and _constant_after_float_output(node):
                # A bias Add / scale Mul on a MatMul's output: onnxruntime's MatMulIntegerToFloat
                # returns float, and the float Add/Mul after it is cheaper and exact.
                wanted[node] = False
            else:
                wanted[node] = any(wanted.get(use.node, False) for out in node.outputs for use in out.uses())
        return wanted

    def _quantize_output(self, rule: OpRule, value: ir.Value, wanted: dict[ir.Node, bool]) -> bool:
        if self.profile.placement == QDQPlacement.OP_INPUTS:
            return False  # the next quantized op quantizes it as its input
        consumers = [use.node for use in value.uses()]
        if not consumers and not value.is_graph_output():
            return False
        if (
            len(consumers) == 1
            and not value.is_graph_output()
            and rule_for(consumers[0].op_type, consumers[0].domain) is not None
            and rule_for(consumers[0].op_type, consumers[0].domain).kind == OpKind.FUSABLE_ACTIVATION
            and wanted.get(consumers[0], False)
        ):
            return False
        if rule.float_output_ok and not any(wanted.get(c, False) for c in consumers):
            return False
        return True

    # -- the pass ---------------------------------------------------------------------------

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        groups = _Groups()
        quantized_values: set[str] = set()
        weights: dict[str, tuple[ir.Value, WeightAnnotation]] = {}
        constants: dict[str, ir.Value] = {}
        biases: dict[str, tuple[ir.Value, BiasAnnotation]] = {}
        values_by_name: dict[str, ir.Value] = {}

        def mark_activation(value: ir.Value) -> None:
            quantized_values.add(value.name)
            values_by_name[value.name] = value
            groups.add(value.name)

        # A second run (after SmoothQuant rewired the graph) starts from no annotations.
        for value in [*graph.inputs, *graph.initializers.values(), *(o for n in graph for o in n.outputs)]:
            value.meta.pop(ANNOTATION_KEY, None)
        wanted = self._wanted(graph)
        for node in graph:
            reason = self._static_reason(node)
            rule = rule_for(node.op_type, node.domain)
            quantized = False
            if reason is None and not wanted[node]:
                reason = ONLY_FLOAT_CONSUMERS
            elif reason is None:
                assert rule is not None
                if rule.kind == OpKind.ELEMENTWISE and not _has_int8_operand(node):
                    reason = NO_INT8_OPERAND
                elif rule.kind in _DIRECT_KINDS or _is_table_lookup(node):
                    quantized = True
                elif rule.kind == OpKind.CONCAT and any(constant_array(v) is not None for v in node.inputs):
                    reason = "a constant Concat input cannot share the calibrated scale"
                else:
                    inputs = node.inputs if rule.kind == OpKind.CONCAT else node.inputs[:1]
                    # Relu/Clip also follow a quantized producer whose output they take over (rule 4a).
                    fusable = rule.kind == OpKind.FUSABLE_ACTIVATION
                    quantized = any(
                        v is not None and (v.name in quantized_values or (fusable and _from_quantized_node(v)))
                        for v in inputs
                    )
                    if not quantized:
                        reason = "its input is not quantized (nothing to fuse with)"
            if not quantized:
                node.meta[DECISION_KEY] = NodeDecision(False, reason or "")
                continue
            assert rule is not None
            node.meta[DECISION_KEY] = NodeDecision(True)
            self._annotate_inputs(node, rule, mark_activation, weights, constants, biases)

            # Outputs.
            if _is_table_lookup(node):
                table, out = node.inputs[0], node.outputs[0]
                constants[table.name] = table
                mark_activation(out)
                groups.union(table.name, out.name)  # the table's name is the group's name
            elif rule.kind in (OpKind.SHARED, OpKind.LOOKUP):
                source = node.inputs[0]
                for out in node.outputs:
                    if out.dtype == ir.DataType.FLOAT:
                        mark_activation(out)
                        groups.union(source.name, out.name)
            elif rule.kind == OpKind.CONCAT:
                out = node.outputs[0]
                mark_activation(out)
                for v in node.inputs:
                    if v is not None and v.name in quantized_values:
                        groups.union(out.name, v.name)
            else:
                for out in node.outputs:
                    if out.dtype == ir.DataType.FLOAT and self._quantize_output(rule, out, wanted):
                        mark_activation(out)

        # A constant that is an operand of an Add in one place and a weight in another is a weight.
        for name in list(constants):
            if name in weights:
                del constants[name]
        for name in quantized_values:
            value = values_by_name[name]
            value.meta[ANNOTATION_KEY] = ActivationAnnotation(self._activation_spec, groups.find(name))
        for value, annotation in weights.values():
            value.meta[ANNOTATION_KEY] = annotation
        for value in constants.values():
            value.meta[ANNOTATION_KEY] = ConstantAnnotation(self._activation_spec)
        for value, annotation in biases.values():
            value.meta[ANNOTATION_KEY] = annotation
        return ir.passes.PassResult(model, modified=False)

    def _annotate_inputs(self, node, rule, mark_activation, weights, constants, biases) -> ir.Value | None:
        inputs = list(node.inputs)
        if rule.kind == OpKind.FUSABLE_ACTIVATION or _is_table_lookup(node):
            # Its input is either fused (the producer's output stays unquantized) or already marked;
            # a lookup's table is annotated with its output.
            return None
        activation_indices = range(len(inputs)) if rule.kind == OpKind.CONCAT else rule.activation_inputs
        weight_value = None
        if rule.weight_input is not None and rule.weight_input < len(inputs):
            candidate = inputs[rule.weight_input]
            data = constant_array(candidate)
            if data is not None and candidate.dtype == ir.DataType.FLOAT:
                weight_value = candidate
                axis = self._weight_axis(node, rule, data)
                annotation = WeightAnnotation(QuantSpec(QuantDType.INT8, symmetric=True, axis=axis))
                previous = weights.get(candidate.name)
                if previous is not None and previous[1] != annotation:
                    # Shared by nodes wanting different axes: one scale for the tensor serves both.
                    annotation = WeightAnnotation(QuantSpec(QuantDType.INT8, symmetric=True, axis=None))
                weights[candidate.name] = (candidate, annotation)
        for index in activation_indices:
            if index >= len(inputs) or inputs[index] is None or inputs[index] is weight_value:
                continue
            value = inputs[index]
            if value.dtype != ir.DataType.FLOAT:
                continue
            if constant_array(value) is not None:
                constants[value.name] = value
            else:
                mark_activation(value)
        if (
            weight_value is not None
            and self.profile.int32_bias
            and rule.bias_input is not None
            and rule.bias_input < len(inputs)
            and inputs[rule.bias_input] is not None
        ):
            self._annotate_bias(node, rule, inputs, weight_value, biases)
        return weight_value

    def _weight_axis(self, node: ir.Node, rule: OpRule, data: np.ndarray) -> int | None:
        if self.scheme.weight_granularity == WeightGranularity.PER_TENSOR:
            return None
        if node.op_type == "ConvTranspose" and _int_attr(node, "group", 1) != 1:
            # Axis 1 holds C_out/group channels shared by every group: no scale per output channel.
            return None
        attributes = {"transB": _int_attr(node, "transB", 0)}
        return weight_axis_for(rule, attributes, data.ndim)

    def _annotate_bias(self, node, rule, inputs, weight_value, biases) -> None:
        bias = inputs[rule.bias_input]
        data = constant_array(bias)
        activation = inputs[rule.activation_inputs[0]]
        if data is None or data.ndim != 1 or bias.dtype != ir.DataType.FLOAT:
            return  # left float: e.g. a Gemm C of shape (M, N) is not a per-channel bias
        if node.op_type == "Gemm" and (
            _float_attr(node, "beta", 1.0) != 1.0 or _float_attr(node, "alpha", 1.0) != 1.0 or _int_attr(node, "transA", 0)
        ):
            return
        if bias.name in biases or len(bias.uses()) > 1:
            return  # a bias shared between layers cannot take two derived scales
        biases[bias.name] = (bias, BiasAnnotation(input=activation.name, weight=weight_value.name, node=node.name or node.op_type))


def _constant_after_float_output(node: ir.Node) -> bool:
    """Add/Mul of a constant and the output of an op whose int8 kernel can return float (MatMul, Gemm)."""
    constants = [v for v in node.inputs if v is not None and constant_array(v) is not None]
    others = [v for v in node.inputs if v is not None and constant_array(v) is None]
    if len(constants) != 1 or len(others) != 1 or others[0].producer() is None:
        return False
    producer = others[0].producer()
    rule = rule_for(producer.op_type, producer.domain)
    return rule is not None and rule.float_output_ok


def _has_int8_operand(node: ir.Node) -> bool:
    """Some non-constant operand is produced by a node already decided quantized (its output is int8).

    Rule 2's exception for Add/Mul: an operand from a float op (Erf, LayerNormalization, a graph
    input) needs a standalone QuantizeLinear, so QLinearAdd/QLinearMul costs more than the float op
    it replaces; a residual Add of two int8 Conv outputs costs nothing extra.
    """
    return any(v is not None and constant_array(v) is None and _from_quantized_node(v) for v in node.inputs)


def _is_activation_matmul(node: ir.Node) -> bool:
    """A MatMul whose second operand is computed, not a constant weight (attention's Q·Kᵀ, softmax·V)."""
    return (
        node.op_type == "MatMul"
        and node.domain in ("", "ai.onnx")
        and len(node.inputs) > 1
        and node.inputs[1] is not None
        and constant_array(node.inputs[1]) is None
    )


def _is_table_lookup(node: ir.Node, min_bytes: int = MIN_LOOKUP_TABLE_BYTES) -> bool:
    """A Gather from a constant float table (an embedding lookup) of at least ``min_bytes``."""
    return (
        node.op_type == "Gather"
        and node.domain in ("", "ai.onnx")
        and bool(node.inputs)
        and node.inputs[0] is not None
        and node.inputs[0].dtype == ir.DataType.FLOAT
        and node.inputs[0].const_value is not None
        and not node.inputs[0].is_graph_input()
        and node.inputs[0].const_value.nbytes >= min_bytes
    )


def _from_quantized_node(value: ir.Value) -> bool:
    """The value is produced by a node already decided quantized (e.g. a Conv before its Relu)."""
    producer = value.producer()
    decision = None if producer is None else producer.meta.get(DECISION_KEY)
    return decision is not None and decision.quantized


def _int_attr(node: ir.Node, name: str, default: int) -> int:
    attr = node.attributes.get(name)
    return default if attr is None else int(attr.value)


def _float_attr(node: ir.Node, name: str, default: float) -> float:
    attr = node.attributes.get(name)
    return default if attr is None else float(attr.value)


def decision_summary(model: ir.Model) -> tuple[dict[str, int], list[tuple[str, str, str]]]:
    """Quantized node counts by op, and (name, op, reason) of every node left float, in graph order."""
    quantized: dict[str, int] = {}
    left_float: list[tuple[str, str, str]] = []
    for node in model.graph:
        decision = node.meta.get(DECISION_KEY)
        if decision is None:
            continue
        if decision.quantized:
            quantized[node.op_type] = quantized.get(node.op_type, 0) + 1
        else:
            left_float.append((node.name or "", node.op_type, decision.reason))
    return quantized, left_float


def quantized_node_names(model: ir.Model) -> frozenset[str]:
    """Names of the nodes annotation decided to run in int8."""
    return frozenset(
        node.name for node in model.graph if (d := node.meta.get(DECISION_KEY)) is not None and d.quantized and node.name
    )
