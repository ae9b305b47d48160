"""PlaceQDQPass: materialize QuantizeLinear/DequantizeLinear from annotations and qparams.

- Weights, constants and biases are stored as integer initializers (int8 / uint8 / int32) read by a
  DequantizeLinear, so the file really holds 1-byte weights. Per-channel tensors carry the
  DequantizeLinear ``axis`` (ONNX opset 13+). int32 biases omit the zero point (0 by the ONNX spec).
- An activation ``t`` gets ``t → QuantizeLinear → DequantizeLinear → t_dq``. When ``t`` is made by
  an int8 op, every consumer of ``t`` reads ``t_dq`` (a consumer left reading ``t`` would keep
  onnxruntime from fusing the producer into its int8 kernel), and a graph output keeps its name:
  the producer's tensor is renamed and the DequantizeLinear writes the output.
- When ``t`` is made by a float op (or is a graph input), only the int8 consumers read ``t_dq``;
  float consumers and graph outputs keep the exact ``t``: there is no producer kernel to fuse, and
  rounding there only adds error (the residual Add of a transformer reads LayerNormalization's
  exact output while the next MatMul reads the quantized copy).
- Tensors of one group use the same scale/zero-point initializers.

Precondition: AssignQParamsPass and DeriveBiasPass have run.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from qcompile.errors import InternalError
from qcompile.graph.names import FreshNames
from qcompile.graph.queries import constant_array
from qcompile.quant.qparams import QParams, quantize
from qcompile.quant.spec import ANNOTATION_KEY, DECISION_KEY, QPARAMS_KEY, ROUNDED_KEY, ActivationAnnotation, QuantDType

_DTYPES = {
    "uint8": ir.DataType.UINT8,
    "int8": ir.DataType.INT8,
    "int32": ir.DataType.INT32,
}


class PlaceQDQPass(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        self._fresh = FreshNames(graph)
        self._group_params: dict[str, tuple[ir.Value, ir.Value]] = {}
        modified = False
        # Positions of the original nodes, read once: graph.index is a linear scan per call.
        self._position = {id(n): i for i, n in enumerate(graph)}
        constants = [v for v in graph.initializers.values() if QPARAMS_KEY in v.meta]
        constants += [o for n in graph if n.op_type == "Constant" for o in n.outputs if QPARAMS_KEY in o.meta]
        activations = [v for v in graph.inputs if QPARAMS_KEY in v.meta]
        activations += [o for n in list(graph) for o in n.outputs if QPARAMS_KEY in o.meta and o not in constants]
        for value in constants:
            self._quantize_constant(graph, value)
            modified = True
        for value in activations:
            self._quantize_activation(graph, value)
            modified = True
        if modified and model.opset_imports.get("", 0) < 13:
            model.opset_imports[""] = 13
        return ir.passes.PassResult(model, modified=modified)

    def _initializer(self, graph: ir.Graph, base: str, array: np.ndarray) -> ir.Value:
        value = ir.Value(name=self._fresh(base), const_value=ir.tensor(array))
        value.dtype = ir.DataType.from_numpy(array.dtype)
        value.shape = ir.Shape(array.shape)
        graph.register_initializer(value)
        return value

    def _scale_zero_point(self, graph: ir.Graph, base: str, qp: QParams) -> tuple[ir.Value, ir.Value]:
        scale = self._initializer(graph, f"{base}_scale", qp.scale.astype(np.float32))
        zero_point = self._initializer(graph, f"{base}_zero_point", qp.zero_point)
        return scale, zero_point

    @staticmethod
    def _dq_attributes(qp: QParams) -> dict:
        return {"axis": qp.spec.axis} if qp.spec.axis is not None and qp.scale.ndim == 1 else {}

    def _quantize_constant(self, graph: ir.Graph, value: ir.Value) -> None:
        qp: QParams = value.meta[QPARAMS_KEY]
        data = constant_array(value)
        # Integers chosen by RoundWeightsPass, when it ran; otherwise round to nearest.
        rounded = value.meta.pop(ROUNDED_KEY, None)
        if rounded is None:
            rounded = quantize(data, qp)
        elif rounded.shape != data.shape or rounded.dtype != qp.dtype.numpy:
            raise InternalError(f"rounded weights of {value.name!r} do not match its shape or type")
        quantized = self._initializer(graph, f"{value.name}_quantized", rounded)
        if qp.dtype == QuantDType.INT32:
            # An int32 bias's zero point is 0, DequantizeLinear's default: leave the input out.
            # (Weights keep theirs: onnxruntime 1.32 does not fuse Gemm into QGemm without it.)
            inputs = [quantized, self._initializer(graph, f"{value.name}_scale", qp.scale.astype(np.float32))]
        else:
            inputs = [quantized, *self._scale_zero_point(graph, value.name, qp)]
        dq = ir.node(
            "DequantizeLinear",
            inputs,
            attributes=self._dq_attributes(qp),
            outputs=[ir.Value(name=self._fresh(f"{value.name}_dequantized"))],
            name=self._fresh(f"{value.name}_DequantizeLinear"),
        )
        out = dq.outputs[0]
        out.dtype, out.shape = ir.DataType.FLOAT, value.shape
        # The constant's uses are original nodes (no inserted node reads a constant), so their
        # positions read at the start give the same first use as a fresh scan.
        users = [u.node for u in value.uses()]
        first_use = min(users, key=lambda n: self._position[id(n)]) if users else graph.node(0)
        graph.insert_before(first_use, dq)
        # Node inputs only: a constant that is also a graph output stays float there.
        for use in list(value.uses()):
            use.node.replace_input_with(use.idx, out)
        if value.is_initializer() and not value.uses() and not value.is_graph_output():
            graph.initializers.pop(value.name)
        value.meta.pop(QPARAMS_KEY)

    def _quantize_activation(self, graph: ir.Graph, value: ir.Value) -> None:
        qp: QParams = value.meta[QPARAMS_KEY]
        annotation = value.meta.get(ANNOTATION_KEY)
        group = annotation.group if isinstance(annotation, ActivationAnnotation) else value.name
        if group not in self._group_params:
            self._group_params[group] = self._scale_zero_point(graph, group, qp)
        scale, zero_point = self._group_params[group]
        producer = value.producer()
        uses = list(value.uses())
        was_output = value.is_graph_output()
        if not _runs_int8(producer):
            # Nothing to fuse: float readers keep the exact tensor (and a graph output its value).
            uses = [use for use in uses if _runs_int8(use.node)]
            was_output = False
        name = value.name
        q = ir.node(
            "QuantizeLinear",
            [value, scale, zero_point],
            outputs=[ir.Value(name=self._fresh(f"{name}_quantized"))],
            name=self._fresh(f"{name}_QuantizeLinear"),
        )
        q.outputs[0].dtype, q.outputs[0].shape = _DTYPES[qp.dtype.value], value.shape
        dq = ir.node(
            "DequantizeLinear",
            [q.outputs[0], scale, zero_point],
            outputs=[ir.Value(name=self._fresh(f"{name}_dequantized"))],
            name=self._fresh(f"{name}_DequantizeLinear"),
        )
        dq_out = dq.outputs[0]
        dq_out.dtype, dq_out.shape = ir.DataType.FLOAT, value.shape
        if producer is None:
            graph.insert_before(graph.node(0), [q, dq]) if len(graph) else graph.extend([q, dq])
        else:
            graph.insert_after(producer, [q, dq])
        for use in uses:
            use.node.replace_input_with(use.idx, dq_out)
        if was_output:
            # The graph output keeps its name: the float tensor is renamed, DQ writes the output.
            index = list(graph.outputs).index(value)
            value.name = self._fresh(f"{name}_float")
            self._fresh.release(name)
            dq_out.name = name
            graph.outputs[index] = dq_out
        value.meta.pop(QPARAMS_KEY)


def _runs_int8(node: ir.Node | None) -> bool:
    """Annotation decided the node runs quantized (None: a graph input, made by no node)."""
    decision = None if node is None else node.meta.get(DECISION_KEY)
    return decision is not None and decision.quantized
