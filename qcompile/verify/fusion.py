"""The fusion check: does onnxruntime turn our Q/DQ pattern into int8 kernels, or run floats between them?

onnxruntime fuses ``DequantizeLinear → op → QuantizeLinear`` groups into integer kernels (QLinearConv,
QGemm, QLinearAdd, ...) when the pattern matches its selectors; where it does not, the op runs in
float between a DequantizeLinear and a QuantizeLinear, and quantization only *adds* work. The check
builds a session for the target, saves the optimized graph, and classifies what is left:

- a DequantizeLinear / QuantizeLinear at a float↔int boundary (model input/output, or next to an op
  that is float by decision) is expected;
- an op whose inputs come from a DequantizeLinear and whose output goes into a QuantizeLinear is an
  *unfused* op: it runs in float inside a quantized region;
- a MatMulInteger left standalone is unfused too: the dynamic-quantization form
  (``quantize_dynamic_matmul``) is written to become MatMulIntegerToFloat / DynamicQuantizeMatMul,
  and where it does not, its int32 result is converted and scaled by separate float ops;
- a DequantizeLinear of an int4/uint4 weight left in the graph is an unfused int4 MatMul
  (``quantize_int4_weights`` writes DequantizeLinear → MatMul for MatMulNBits): the weight is
  dequantized to float on every run and the MatMul runs in float, slower than the float model.
  The report gives the reason onnxruntime's selector declined it where qcompile knows it
  (``matmulnbits_blocker``).

Uses ``ORT_ENABLE_EXTENDED`` (the QDQ fusions run at that level; ALL adds hardware-specific layout
changes that do not change what is fused).
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import onnx
import onnxruntime as ort

import onnx_ir as ir

from qcompile.errors import InvalidModelError
from qcompile.passes.quantize_int4_weights import matmulnbits_blocker

_QDQ = ("QuantizeLinear", "DequantizeLinear")
_INT4_TYPES = (onnx.TensorProto.INT4, onnx.TensorProto.UINT4)


@dataclass(frozen=True)
class FusionReport:
    provider: str
    quantize_nodes: int  # left after optimization
    dequantize_nodes: int
    unfused_ops: dict[str, int] = field(default_factory=dict)  # op type → count running in float between DQ and Q
    unfused_nodes: tuple[str, ...] = ()
    kernels: dict[str, int] = field(default_factory=dict)  # integer kernels the runtime chose
    # Ops float by the compiler's decision that still sit between DQ and Q (expected boundaries).
    float_between: dict[str, int] = field(default_factory=dict)
    # int4 weights still dequantized in the optimized graph: the MatMul's name → why it is not MatMulNBits.
    unfused_int4_weights: dict[str, str] = field(default_factory=dict)

    @property
    def fused(self) -> bool:
        return not self.unfused_ops and not self.unfused_int4_weights

    def to_json(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "fused": self.fused,
            "quantize_nodes_left": self.quantize_nodes,
            "dequantize_nodes_left": self.dequantize_nodes,
            "unfused_ops": dict(sorted(self.unfused_ops.items())),
            "unfused_nodes": list(self.unfused_nodes),
            "int8_kernels": dict(sorted(self.kernels.items())),
            "float_by_decision_between_qdq": dict(sorted(self.float_between.items())),
            "unfused_int4_weights": dict(sorted(self.unfused_int4_weights.items())),
        }

    def summary(self) -> str:
        kernels = ", ".join(f"{k}×{n}" for k, n in sorted(self.kernels.items())) or "none"
        text = (
            f"onnxruntime {self.provider.upper()}: integer kernels {kernels}; "
            f"{self.quantize_nodes} QuantizeLinear and {self.dequantize_nodes} DequantizeLinear left"
        )
        if self.float_between:
            ops = ", ".join(f"{k}×{n}" for k, n in sorted(self.float_between.items()))
            text += f"; float by decision between int8 regions: {ops}"
        if self.fused:
            return text + "; every quantized op fused"
        if self.unfused_ops:
            ops = ", ".join(f"{k}×{n}" for k, n in sorted(self.unfused_ops.items()))
            text += f"; NOT FUSED, run in float between DQ and Q: {ops}"
        if self.unfused_int4_weights:
            why = "; ".join(f"{name}: {reason}" for name, reason in sorted(self.unfused_int4_weights.items()))
            text += (
                f"; NOT FUSED, {len(self.unfused_int4_weights)} int4 weight(s) dequantized to float every run "
                f"(MatMul in float, not MatMulNBits): {why}"
            )
        return text


def _is_integer_kernel(node: onnx.NodeProto) -> bool:
    name = node.op_type
    return (
        name.startswith("QLinear")
        or name in ("QGemm", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "ConvInteger", "MatMulNBits")
        or (name.startswith("Nhwc") and "QLinear" in name)
    )


def optimized_graph(model: onnx.ModelProto, provider: str = "cpu") -> onnx.ModelProto:
    """The graph onnxruntime runs after its optimizations (CPU provider)."""
    if provider != "cpu":
        raise NotImplementedError("the fusion check runs on the CPU provider")
    so = ort.SessionOptions()
    so.log_severity_level = 4
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    with tempfile.TemporaryDirectory(prefix="qcompile-fusion-") as tmp:
        so.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        try:
            ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime's own exception types share no base
            raise InvalidModelError(f"onnxruntime cannot load the quantized model: {str(exc).splitlines()[0]}") from None
        return onnx.load(so.optimized_model_filepath)


def check_fusion(
    model: onnx.ModelProto, provider: str = "cpu", quantized_by_decision: frozenset[str] | None = None
) -> FusionReport:
    """Classify what is left of the Q/DQ nodes after onnxruntime's optimizations.

    ``quantized_by_decision``: names of the nodes the compiler quantized. An op between a
    DequantizeLinear and a QuantizeLinear is a fusion failure only when it is one of those; any
    other (a node left float on purpose, or a float node onnxruntime made by fusing float ops, such
    as SkipLayerNormalization from Add + LayerNormalization) is a float↔int boundary. Without the
    set, every op between them counts as unfused.
    """
    optimized = optimized_graph(model, provider)
    graph = optimized.graph
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    unfused: Counter = Counter()
    float_between: Counter = Counter()
    unfused_names: list[str] = []
    for node in graph.node:
        if node.op_type == "MatMulInteger":
            unfused[node.op_type] += 1
            unfused_names.append(node.name)
            continue
        if node.op_type in _QDQ or _is_integer_kernel(node):
            continue
        reads_dq = any(producer.get(i) is not None and producer[i].op_type == "DequantizeLinear" for i in node.input)
        feeds_q = any(c.op_type == "QuantizeLinear" for o in node.output for c in consumers.get(o, []))
        if not (reads_dq and feeds_q):
            continue
        if quantized_by_decision is not None and node.name not in quantized_by_decision:
            float_between[node.op_type] += 1
        else:
            unfused[node.op_type] += 1
            unfused_names.append(node.name)
    ops = Counter(n.op_type for n in graph.node)
    return FusionReport(
        unfused_int4_weights=_unfused_int4_weights(optimized),
        provider=provider,
        quantize_nodes=ops["QuantizeLinear"],
        dequantize_nodes=ops["DequantizeLinear"],
        unfused_ops=dict(unfused),
        unfused_nodes=tuple(unfused_names),
        kernels={op: n for op, n in ops.items() if _is_integer_kernel(onnx.NodeProto(op_type=op))},
        float_between=dict(float_between),
    )


def _unfused_int4_weights(optimized: onnx.ModelProto) -> dict[str, str]:
    """Each MatMul that still reads an int4/uint4 weight through a DequantizeLinear → why."""
    graph = optimized.graph
    dtypes = {t.name: t.data_type for t in graph.initializer}
    dtypes.update({v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.value_info)})
    dqs = [n for n in graph.node if n.op_type == "DequantizeLinear" and dtypes.get(n.input[0]) in _INT4_TYPES]
    if not dqs:
        return {}
    # The reasons read the graph's structure (consumers, shapes): onnx_ir's view of the same graph.
    ir_graph = ir.from_proto(optimized).graph
    by_output = {node.outputs[0].name: node for node in ir_graph if node.outputs}
    found = {}
    for dq in dqs:
        readers = [use.node for use in by_output[dq.output[0]].outputs[0].uses()]
        if not readers:
            continue
        reader = readers[0]
        name = reader.name or dq.name
        if reader.op_type == "FusedGemm":
            found[name] = (
                "onnxruntime fused the MatMul, its bias Add and the Relu after it into FusedGemm before its "
                "MatMulNBits fusion (a lone Relu after a MatMul stops that fusion)"
            )
        elif reader.op_type in ("MatMul", "Gemm"):
            found[name] = matmulnbits_blocker(reader) or "onnxruntime kept it unfused (no cause known to qcompile)"
        else:
            found[name] = f"the int4 weight is read by {reader.op_type}, which has no int4 kernel"
    return found
