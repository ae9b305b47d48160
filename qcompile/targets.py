"""Target profiles: what a model is compiled for, as data.

``CompileOptions.target`` names one; the passes read its profile instead of branching on the name.
A profile says which precision the compiled model runs in, for int8 the activation and weight types,
which ops get Q/DQ and where, whether biases become int32, which kernels onnxruntime (or TensorRT) is
expected to fuse them into, and for fp16 what stays fp32; and which onnxruntime provider verifies it.

- ``cpu`` (default): onnxruntime's CPU provider. uint8 asymmetric activations × int8 symmetric
  per-channel weights, int32 biases; Q/DQ on op outputs laid out for onnxruntime's QDQ selectors
  (QLinearConv, QGemm, QLinearMatMul, QLinearAdd, ...); the op table (``passes/op_rules.py``) and
  the scheme decide the rest.
- ``tensorrt``: TensorRT explicit quantization. TensorRT reads Q/DQ as "this op runs in int8" and
  fuses the DequantizeLinear into the op that follows, the bias and activation into the op, and the
  next QuantizeLinear into its output. It supports symmetric quantization only (zero point 0), so
  activations are int8 symmetric; Q/DQ go on the *inputs* of Conv / ConvTranspose / Gemm / MatMul
  only (NVIDIA's recommended placement), weights are int8 per output channel, and biases stay float
  (TensorRT folds them into the int8 kernel's epilogue itself).
- ``cuda``: onnxruntime's CUDA provider. It has few int8 kernels: int8 QDQ resnet18 ran slower than
  float there (H100, onnxruntime-gpu 1.31: 1.5x slower with 21 host copies). So the profile is fp16:
  float parts become fp16 (weights and compute, ``passes/convert_fp16.py``), except ops whose values
  calibration saw beyond ``fp16_overflow_limit`` and numerically sensitive ops (``keep_fp32_ops``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from qcompile.options import ActivationDType, Target


class Precision(str, enum.Enum):
    INT8 = "int8"  # Q/DQ int8 model
    FP16 = "fp16"  # float16 model with fp32 islands, no Q/DQ


class QDQPlacement(str, enum.Enum):
    # onnxruntime's QDQ selectors: Q/DQ on op outputs (and inputs at float→int boundaries), shared
    # qparams through data movement, Relu/Clip folded into the producer's output quantization.
    ORT_FUSION = "onnxruntime_fusion"
    # Q/DQ only on the inputs of quantizable ops; outputs, data movement and biases stay float.
    OP_INPUTS = "op_inputs"


@dataclass(frozen=True)
class TargetProfile:
    name: Target
    description: str
    # onnxruntime's execution provider that runs this target, and our session provider name for it
    # ("cpu", "cuda"; None where qcompile's sessions cannot run it: TensorRT).
    execution_provider: str
    session_provider: str | None
    precision: Precision
    # --- int8 ---
    # Activation type; None: the scheme's ``activation_dtype`` (cpu).
    activation_dtype: ActivationDType | None = None
    activation_symmetric: bool = False
    placement: QDQPlacement = QDQPlacement.ORT_FUSION
    # Op types that get Q/DQ; None: every op the op table gives an int8 kernel.
    quantized_ops: tuple[str, ...] | None = None
    # Biases of Conv/Gemm become int32 (scale = input scale × weight scale) or stay float.
    int32_bias: bool = True
    # Kernels the Q/DQ pattern is laid out for (documentation and report).
    fusions: tuple[str, ...] = ()
    # Checks of the output graph's form (``verify/structure.py``), by name.
    structure_checks: tuple[str, ...] = ()
    # onnxruntime CPU's fusion check (``verify/fusion.py``) judges this target's Q/DQ layout. Not
    # for tensorrt: TensorRT fuses what onnxruntime's CPU selectors do not (Q/DQ on inputs only),
    # so its structure check stands in.
    cpu_fusion_check: bool = False
    # --- fp16 ---
    # Ops kept in fp32 even where their values fit fp16 (see ``CUDA``'s comment).
    keep_fp32_ops: tuple[str, ...] = ()
    # An op whose calibrated |x| (inputs or outputs) exceeds this stays fp32: fp16's largest finite
    # value is 65504, and the limit leaves 2x headroom for inputs beyond the calibration data.
    fp16_overflow_limit: float = 32000.0
    # What the profile overrides in the user's options, for the report ("" where nothing).
    overrides: str = ""

    def to_json(self) -> dict:
        return {
            "name": self.name.value,
            "description": self.description,
            "execution_provider": self.execution_provider,
            "precision": self.precision.value,
            "activation_dtype": None if self.activation_dtype is None else self.activation_dtype.value,
            "activation_symmetric": self.activation_symmetric,
            "placement": self.placement.value,
            "quantized_ops": None if self.quantized_ops is None else list(self.quantized_ops),
            "int32_bias": self.int32_bias,
            "fusions": list(self.fusions),
            "structure_checks": list(self.structure_checks),
            "cpu_fusion_check": self.cpu_fusion_check,
            "keep_fp32_ops": list(self.keep_fp32_ops),
            "fp16_overflow_limit": self.fp16_overflow_limit,
        }


CPU = TargetProfile(
    name=Target.CPU,
    description="onnxruntime CPU provider: uint8 activations x int8 per-channel weights, int32 biases",
    execution_provider="CPUExecutionProvider",
    session_provider="cpu",
    precision=Precision.INT8,
    cpu_fusion_check=True,
    fusions=("QLinearConv", "QGemm", "QLinearMatMul", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "MatMulNBits",
             "QLinearAdd", "QLinearMul", "QLinearConcat", "QLinearAveragePool", "QLinearGlobalAveragePool",
             "QLinearSigmoid", "QLinearLeakyRelu"),
)

# TensorRT's int8 layers take Q/DQ on these ops' inputs (NVIDIA, "Explicit Quantization": Q/DQ
# placement recommendations quantize the inputs of weighted layers and let TensorRT propagate).
_TENSORRT_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")

TENSORRT = TargetProfile(
    name=Target.TENSORRT,
    description="TensorRT explicit quantization: symmetric int8 Q/DQ on the inputs of Conv/Gemm/MatMul, float biases",
    execution_provider="TensorrtExecutionProvider",
    session_provider=None,
    precision=Precision.INT8,
    activation_dtype=ActivationDType.INT8,
    activation_symmetric=True,
    placement=QDQPlacement.OP_INPUTS,
    quantized_ops=_TENSORRT_OPS,
    int32_bias=False,
    fusions=("int8 Conv/Deconv + bias + activation", "int8 Gemm/MatMul + bias"),
    structure_checks=("quantized_op_inputs_from_dequantize", "zero_points_zero", "int8_only", "opset_13"),
    overrides="target tensorrt: activations are int8 symmetric and biases float whatever activation_dtype says",
)

CUDA = TargetProfile(
    name=Target.CUDA,
    description="onnxruntime CUDA provider: fp16 weights and compute, fp32 where values overflow fp16 or precision matters",
    execution_provider="CUDAExecutionProvider",
    session_provider="cuda",
    precision=Precision.FP16,
    # Softmax / LogSoftmax / LayerNormalization and reductions sum many terms (exp of logits,
    # squared deviations) whose sums overflow or lose digits in fp16's 11-bit mantissa; Exp / Pow /
    # Sqrt / Log / Reciprocal are where decomposed norms overflow or divide by flushed tiny values
    # (a Div by a computed tensor stays fp32 for the same reason: ``passes/convert_fp16.py``). The
    # list follows PyTorch's CUDA autocast, whose fp32 ops these are. onnxruntime's CUDA kernels
    # accumulate Softmax/LayerNorm in fp32 anyway, but an fp16 *input* has already lost what the
    # previous op's fp32 output held; the cost is a Cast on each side.
    keep_fp32_ops=("Softmax", "LogSoftmax", "LayerNormalization", "ReduceMean", "ReduceSum", "ReduceSumSquare",
                   "ReduceL2", "Exp", "Log", "Pow", "Sqrt", "Reciprocal", "CumSum", "TopK"),
    overrides=(
        "target cuda: nothing is quantized (the scheme's types and bias correction do not apply; keep_float "
        "keeps nodes in fp32); calibration measured every float tensor's min/max for the fp16 overflow guard"
    ),
)

PROFILES: dict[Target, TargetProfile] = {p.name: p for p in (CPU, CUDA, TENSORRT)}


def profile_for(target: Target | str) -> TargetProfile:
    return PROFILES[Target(target)]
