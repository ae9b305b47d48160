"""Structure check of an explicit-quantization (TensorRT) Q/DQ model, on the graph alone.

TensorRT builds int8 layers from the Q/DQ it finds and refuses or ignores forms it does not support.
Where TensorRT is not installed, this is what can be checked without it:

- every quantizable op (Conv, ConvTranspose, Gemm, MatMul) quantized by the compiler reads each of
  its data and weight inputs from a DequantizeLinear (a float input makes TensorRT run the layer in
  float, or fail to fuse); the bias input (index 2 of Conv/Gemm) may be float;
- every QuantizeLinear / DequantizeLinear zero point is 0: TensorRT supports symmetric
  quantization only;
- every quantized tensor is int8 (not uint8 or int32): TensorRT's explicit quantization is int8;
- the default-domain opset is at least 13 (per-channel DequantizeLinear ``axis``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import onnx
from onnx import numpy_helper

QUANTIZABLE_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")
_BIAS_INPUT = {"Conv": 2, "ConvTranspose": 2, "Gemm": 2}


@dataclass(frozen=True)
class StructureReport:
    checks: tuple[str, ...]
    problems: tuple[str, ...] = ()
    quantized_ops: int = 0
    float_ops: tuple[str, ...] = field(default_factory=tuple)  # quantizable ops float by decision

    @property
    def passed(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "checks": list(self.checks),
            "problems": list(self.problems),
            "quantized_ops": self.quantized_ops,
            "float_by_decision": list(self.float_ops),
        }

    def summary(self) -> str:
        head = f"TensorRT structure: {self.quantized_ops} quantizable ops read Q/DQ inputs"
        if self.float_ops:
            head += f"; {len(self.float_ops)} float by decision"
        if self.passed:
            return head + "; every check passed (" + ", ".join(self.checks) + ")"
        shown = "; ".join(self.problems[:5]) + (f"; and {len(self.problems) - 5} more" if len(self.problems) > 5 else "")
        return head + f"; FAILED: {shown}"


def check_tensorrt_structure(
    model: onnx.ModelProto, float_by_decision: frozenset[str] = frozenset(), ops: tuple[str, ...] = QUANTIZABLE_OPS
) -> StructureReport:
    """Check ``model`` against TensorRT's explicit-quantization form (the module docstring's rules).

    ``float_by_decision``: names of nodes the compiler left float on purpose (``keep_float``,
    non-float data); their inputs are not required to come from DequantizeLinear.
    """
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    constants = {init.name: init for init in graph.initializer}
    problems: list[str] = []
    quantized = 0
    kept_float: list[str] = []
    for node in graph.node:
        if node.op_type not in ops or node.domain not in ("", "ai.onnx"):
            continue
        if node.name in float_by_decision:
            kept_float.append(node.name)
            continue
        quantized += 1
        bias = _BIAS_INPUT.get(node.op_type)
        for index, name in enumerate(node.input):
            if not name or index == bias:
                continue
            source = producer.get(name)
            if source is None or source.op_type != "DequantizeLinear":
                what = "graph input" if source is None and name not in constants else (
                    "float constant" if source is None else source.op_type)
                problems.append(f"{node.op_type} {node.name!r} input {index} ({name!r}) comes from a {what}, not DequantizeLinear")
    for node in graph.node:
        if node.op_type not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        if len(node.input) < 3 or not node.input[2]:
            # No zero point: 0 by the ONNX spec, but the type then defaults to uint8 for
            # QuantizeLinear; a DequantizeLinear's type is its input's.
            if node.op_type == "QuantizeLinear":
                problems.append(f"QuantizeLinear {node.name!r} has no zero point: its output is uint8, not int8")
            continue
        zero_point = constants.get(node.input[2])
        if zero_point is None:
            problems.append(f"{node.op_type} {node.name!r}: zero point {node.input[2]!r} is not a constant")
            continue
        array = numpy_helper.to_array(zero_point)
        if array.dtype.name != "int8":
            problems.append(f"{node.op_type} {node.name!r}: {array.dtype.name} zero point, TensorRT needs int8")
        if array.any():
            problems.append(f"{node.op_type} {node.name!r}: nonzero zero point (TensorRT is symmetric only)")
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 13:
        problems.append(f"opset {opset} < 13: per-channel DequantizeLinear needs opset 13")
    checks = ("quantized_op_inputs_from_dequantize", "zero_points_zero", "int8_only", "opset_13")
    return StructureReport(checks=checks, problems=tuple(problems), quantized_ops=quantized, float_ops=tuple(kept_float))
