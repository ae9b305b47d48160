"""QuantizeDynamicMatMulPass: a MatMul whose input comes from a float op quantizes it at run time.

Static quantization puts a standalone QuantizeLinear on a MatMul input produced by a float op
(LayerNormalization, GELU, a float Add, a graph input): ``x → QuantizeLinear → DequantizeLinear →
MatMul(·, DQ(W))``. This pass rewrites that MatMul (constant int8 weight W with scale s_w, per
tensor or one per output column, zero point 0) to

    x_q, s_x, z_x = DynamicQuantizeLinear(x)          # uint8, s_x = (max(x,0) - min(x,0)) / 255
    acc = MatMulInteger(x_q, W, z_x)                  # int32: Σ_k (x_q - z_x) · W
    y   = Cast<float>(acc) * (s_x * s_w)              # ≈ x @ (s_w · W)
    y   = y + bias                                    # the MatMul's float bias Add, if it has one

onnxruntime's CPU graph optimizer fuses MatMulInteger → Cast → Mul(·, Mul(s_x, s_w)) → Add(·, bias)
into one MatMulIntegerToFloat (bias included), and that with a DynamicQuantizeLinear read by no
other node into DynamicQuantizeMatMul: the quantization, the int8 product, the scaling and the bias
run in one or two kernels, where the static form ran a QuantizeLinear, an int8 MatMul and a float
bias Add. The operand order above is the one onnxruntime's fusion matches (Mul(s_x, s_w); the bias
as the Add's second input, a 1-D constant). One DynamicQuantizeLinear serves every MatMul reading x
(attention's Q/K/V projections).

The activation's range is then the tensor's own min/max at run time, not the calibrated range: no
clipping of outliers, but no range mismatch on inputs unlike the calibration data either.

A MatMul whose input is already int8 (the output of an int8 op, whose QuantizeLinear onnxruntime
fuses into that op) keeps the static form. After the rewrite, a static QuantizeLinear/
DequantizeLinear pair whose DequantizeLinear now feeds only float ops is bypassed (its readers take
the float tensor again; ``remove_unused`` drops the pair): it would only round a float op's input.

Precondition: PlaceQDQPass has run; node decisions (``DECISION_KEY``) are still on the nodes.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompile.graph.names import FreshNames
from qcompile.graph.notes import add_note
from qcompile.graph.queries import constant_array
from qcompile.quant.spec import DECISION_KEY


class QuantizeDynamicMatMulPass(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        self._fresh = FreshNames(graph)
        dynamic: dict[ir.Value, ir.Node] = {}  # float input → its DynamicQuantizeLinear
        static_pairs: list[ir.Node] = []  # the DequantizeLinear of each bypassed static pair
        rewritten = 0
        for node in list(graph):
            match = _match(node)
            if match is None:
                continue
            dq_x, weight_dq = match
            x = dq_x.inputs[0].producer().inputs[0]
            if x not in dynamic:
                dynamic[x] = self._dynamic_quantize(x)
                if x.producer() is None:
                    graph.insert_before(graph.node(0), dynamic[x])
                else:
                    graph.insert_after(x.producer(), dynamic[x])
            self._rewrite(graph, node, dynamic[x], weight_dq)
            if dq_x not in static_pairs:
                static_pairs.append(dq_x)
            rewritten += 1
        bypassed = sum(_bypass_if_float_only(dq) for dq in static_pairs)
        if rewritten:
            add_note(
                model,
                f"{rewritten} MatMul(s) quantize their input at run time "
                f"({len(dynamic)} DynamicQuantizeLinear); {bypassed} static Q/DQ pair(s) left feeding only float ops removed",
            )
        return ir.passes.PassResult(model, modified=rewritten > 0)

    def _value(self, base: str, dtype: ir.DataType, shape: ir.Shape | None = None) -> ir.Value:
        value = ir.Value(name=self._fresh(base))
        value.dtype, value.shape = dtype, shape
        return value

    def _dynamic_quantize(self, x: ir.Value) -> ir.Node:
        outputs = [
            self._value(f"{x.name}_dynamic_quantized", ir.DataType.UINT8, x.shape),
            self._value(f"{x.name}_dynamic_scale", ir.DataType.FLOAT, ir.Shape([])),
            self._value(f"{x.name}_dynamic_zero_point", ir.DataType.UINT8, ir.Shape([])),
        ]
        return ir.node("DynamicQuantizeLinear", [x], outputs=outputs, name=self._fresh(f"{x.name}_DynamicQuantizeLinear"))

    def _rewrite(self, graph: ir.Graph, matmul: ir.Node, dql: ir.Node, weight_dq: ir.Node) -> None:
        x_q, x_scale, x_zero_point = dql.outputs
        w_q, w_scale = weight_dq.inputs[0], weight_dq.inputs[1]
        w_zero_point = weight_dq.inputs[2] if len(weight_dq.inputs) > 2 else None
        zp = constant_array(w_zero_point)
        inputs = [x_q, w_q, x_zero_point]
        if zp is not None and np.any(zp != 0):
            inputs.append(w_zero_point)  # 0 is MatMulInteger's default: left out when it is 0
        base = matmul.name or "MatMul"
        out = matmul.outputs[0]
        integer = ir.node("MatMulInteger", inputs, outputs=[self._value(f"{base}_int32", ir.DataType.INT32, out.shape)],
                          name=self._fresh(f"{base}_MatMulInteger"))
        cast = ir.node("Cast", integer.outputs, attributes={"to": ir.DataType.FLOAT},
                       outputs=[self._value(f"{base}_int32_float", ir.DataType.FLOAT, out.shape)], name=self._fresh(f"{base}_Cast"))
        scale = ir.node("Mul", [x_scale, w_scale], outputs=[self._value(f"{base}_output_scale", ir.DataType.FLOAT)],
                        name=self._fresh(f"{base}_scale_Mul"))
        rescale = ir.node("Mul", [cast.outputs[0], scale.outputs[0]],
                          outputs=[self._value(f"{base}_rescaled", ir.DataType.FLOAT, out.shape)], name=self._fresh(f"{base}_Mul"))
        # The report lists it among the quantized nodes (as MatMulInteger, what the file holds).
        if DECISION_KEY in matmul.meta:
            integer.meta[DECISION_KEY] = matmul.meta[DECISION_KEY]
        new_nodes, old_nodes, result = [integer, cast, scale, rescale], [matmul], rescale.outputs[0]
        add, bias = _bias_add(matmul)
        if add is not None:
            # Bias second, as onnxruntime's MatMulIntegerToFloat fusion reads it.
            new_add = ir.node("Add", [result, bias], outputs=[self._value(f"{add.name}_output", ir.DataType.FLOAT)],
                              name=self._fresh(f"{add.name or 'Add'}_bias"))
            new_nodes.append(new_add)
            old_nodes.append(add)
            out, result = add.outputs[0], new_add.outputs[0]
        ir.convenience.replace_nodes_and_values(graph, old_nodes[-1], old_nodes, new_nodes, [out], [result])


def _match(node: ir.Node) -> tuple[ir.Node, ir.Node] | None:
    """(the input's DequantizeLinear, the weight's DequantizeLinear) when ``node`` is a candidate."""
    if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 2:
        return None
    x_dq, w_dq = (v.producer() if v is not None else None for v in node.inputs)
    if x_dq is None or w_dq is None or x_dq.op_type != "DequantizeLinear" or w_dq.op_type != "DequantizeLinear":
        return None
    q = x_dq.inputs[0].producer()
    if q is None or q.op_type != "QuantizeLinear" or q.inputs[0] is None or q.inputs[0].dtype != ir.DataType.FLOAT:
        return None
    if x_dq.inputs[0].dtype != ir.DataType.UINT8:
        return None  # DynamicQuantizeLinear is uint8 only; an int8 activation scheme keeps its static form
    if not _float_producer(q.inputs[0]):
        return None  # an int8 op's output: its QuantizeLinear is fused into that op
    weight = constant_array(w_dq.inputs[0])
    if weight is None or weight.dtype != np.int8 or weight.ndim < 2 or w_dq.inputs[0].is_graph_input():
        return None  # a 1-D weight (a matrix-vector product) keeps the static form
    w_scale = constant_array(w_dq.inputs[1])
    if w_scale is None or w_scale.size > 1 and not _per_column(w_dq, weight):
        return None
    return x_dq, w_dq


def _float_producer(value: ir.Value) -> bool:
    """The value is a graph input or the output of a node decided float (not an int8 kernel)."""
    producer = value.producer()
    if producer is None:
        return True
    decision = producer.meta.get(DECISION_KEY)
    return decision is not None and not decision.quantized


def _per_column(w_dq: ir.Node, weight: np.ndarray) -> bool:
    """One scale per output column (the last axis of a 2-D weight): what MatMulIntegerToFloat accepts."""
    axis = w_dq.attributes.get("axis")
    axis = 1 if axis is None else int(axis.value)
    return weight.ndim == 2 and axis in (1, -1)


def _bias_add(matmul: ir.Node) -> tuple[ir.Node | None, ir.Value | None]:
    """The Add of a constant 1-D bias that is the MatMul's only reader, if there is one."""
    out = matmul.outputs[0]
    uses = list(out.uses())
    if out.is_graph_output() or len(uses) != 1 or uses[0].node.op_type != "Add" or uses[0].node.domain not in ("", "ai.onnx"):
        return None, None
    add = uses[0].node
    other = add.inputs[1 - uses[0].idx]
    data = constant_array(other)
    if data is None or data.ndim != 1 or data.shape[0] <= 1 or other.dtype != ir.DataType.FLOAT:
        return None, None
    return add, other


def _bypass_if_float_only(dq: ir.Node) -> bool:
    """Readers of a static pair that are all float ops read the float tensor again (the pair goes unused)."""
    out = dq.outputs[0]
    if out.is_graph_output():
        return False
    uses = list(out.uses())
    for use in uses:
        decision = use.node.meta.get(DECISION_KEY)
        if decision is not None and decision.quantized:
            return False
    x = dq.inputs[0].producer().inputs[0]
    for use in uses:
        use.node.replace_input_with(use.idx, x)
    return True
