"""Per-op quantization knowledge, as data: one table, no class per op.

Each rule says which inputs of an op are quantized activations, which input is the weight (and its
output-channel axis), which is the bias, and how the op's output relates to its inputs:

- ``COMPUTE``: Conv/Gemm/MatMul: quantized inputs and weight, int32 bias, own output qparams.
- ``ELEMENTWISE``: Add/Mul: both operands quantized (a constant operand from its own values).
- ``UNARY``: ops with their own int8 kernel (QLinearSigmoid, QLinearAveragePool, ...): input and
  output quantized, each with its own qparams.
- ``FUSABLE_ACTIVATION``: Relu/Clip. Their quantization *is* the clipping, so when one follows a
  quantized op, the op's output is not quantized; the activation's output is (onnxruntime then
  drops the Relu/Clip into the QuantizeLinear and fuses the rest).
- ``SHARED``: data movement (Reshape, Transpose, MaxPool, Resize, ...): quantized only when their
  input is, and their outputs share the input's qparams so the Q/DQ pair around them cancels.
- ``CONCAT``: all inputs and the output share one set of qparams.
- ``LOOKUP``: Gather. From a constant table (an embedding), the table is stored in the activation
  type, per tensor, and the output shares its qparams (onnxruntime then gathers int8 rows and
  dequantizes only those); always done, for size. From activations, it is data movement (SHARED).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class OpKind(str, enum.Enum):
    COMPUTE = "compute"
    ELEMENTWISE = "elementwise"
    UNARY = "unary"
    FUSABLE_ACTIVATION = "fusable_activation"
    SHARED = "shared"
    CONCAT = "concat"
    LOOKUP = "lookup"


@dataclass(frozen=True)
class OpRule:
    op_type: str
    kind: OpKind
    # Inputs quantized as activations (a constant there is quantized from its own values).
    activation_inputs: tuple[int, ...] = (0,)
    # Input holding a constant weight, quantized symmetric int8 (per channel along weight_axis).
    weight_input: int | None = None
    # Output-channel axis of the weight. For Gemm it depends on transB (see weight_axis_for).
    weight_axis: int | None = None
    # Input holding the bias, derived as int32 with scale = input scale × weight scale.
    bias_input: int | None = None
    # The int8 kernel can return float (QGemm, MatMulIntegerToFloat): a graph output produced by
    # this op, or one read only by float ops, is left unquantized rather than rounded again.
    float_output_ok: bool = False
    # onnxruntime's CPU provider has an int8 kernel (or drops the Q/DQ pair) for this op. Without
    # one, quantizing it runs DequantizeLinear → float op → QuantizeLinear: only added work.
    int8_kernel: bool = True

    def __post_init__(self) -> None:
        if (self.weight_input is None) != (self.weight_axis is None) and self.op_type != "MatMul":
            raise ValueError(f"{self.op_type}: weight_input and weight_axis go together")


_RULES = (
    OpRule("Conv", OpKind.COMPUTE, (0,), weight_input=1, weight_axis=0, bias_input=2),
    # ConvTranspose weights are (C_in, C_out/group, k...): output channels on axis 1.
    OpRule("ConvTranspose", OpKind.COMPUTE, (0,), weight_input=1, weight_axis=1, bias_input=2),
    # Gemm: B is (K, N) or, with transB=1, (N, K); see weight_axis_for.
    OpRule("Gemm", OpKind.COMPUTE, (0,), weight_input=1, weight_axis=1, bias_input=2, float_output_ok=True),
    # MatMul: B is a weight only when constant; otherwise both operands are activations.
    OpRule("MatMul", OpKind.COMPUTE, (0, 1), weight_input=1, weight_axis=None, float_output_ok=True),
    OpRule("Add", OpKind.ELEMENTWISE, (0, 1)),
    OpRule("Mul", OpKind.ELEMENTWISE, (0, 1)),
    OpRule("AveragePool", OpKind.UNARY),
    OpRule("GlobalAveragePool", OpKind.UNARY),
    OpRule("Sigmoid", OpKind.UNARY),
    # Measured with onnxruntime 1.32 (qcompile.verify.fusion): no QLinearHardSigmoid, stays float.
    OpRule("HardSigmoid", OpKind.UNARY, int8_kernel=False),
    OpRule("LeakyRelu", OpKind.UNARY),
    OpRule("Relu", OpKind.FUSABLE_ACTIVATION),
    OpRule("Clip", OpKind.FUSABLE_ACTIVATION),
    OpRule("Concat", OpKind.CONCAT, activation_inputs=()),  # every input, however many
    OpRule("MaxPool", OpKind.SHARED),
    OpRule("Resize", OpKind.SHARED),
    OpRule("Reshape", OpKind.SHARED),
    OpRule("Transpose", OpKind.SHARED),
    OpRule("Flatten", OpKind.SHARED),
    OpRule("Squeeze", OpKind.SHARED),
    OpRule("Unsqueeze", OpKind.SHARED),
    OpRule("Slice", OpKind.SHARED),
    OpRule("Split", OpKind.SHARED),
    OpRule("Gather", OpKind.LOOKUP),
)

OP_RULES: dict[str, OpRule] = {rule.op_type: rule for rule in _RULES}


def rule_for(op_type: str, domain: str = "") -> OpRule | None:
    if domain not in ("", "ai.onnx"):
        return None
    return OP_RULES.get(op_type)


def weight_axis_for(rule: OpRule, attributes: dict[str, int], weight_rank: int) -> int | None:
    """Output-channel axis of a node's weight, or None when it has no per-channel axis."""
    if rule.op_type == "Gemm":
        return 0 if attributes.get("transB", 0) else 1
    if rule.op_type == "MatMul":
        # (K, N) weight: one scale per output column. Batched (rank > 2) weights: per tensor.
        return 1 if weight_rank == 2 else None
    return rule.weight_axis
