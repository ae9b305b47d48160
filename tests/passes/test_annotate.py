"""AnnotatePass: decisions and specs on tiny graphs (no numbers involved yet)."""

import numpy as np
import onnx_ir.passes.common as common_passes
import pytest

from qcompile.options import SchemeOptions, WeightGranularity
from qcompile.passes import AnnotatePass
from qcompile.quant.spec import (
    ANNOTATION_KEY,
    DECISION_KEY,
    ActivationAnnotation,
    BiasAnnotation,
    ConstantAnnotation,
    QuantDType,
    WeightAnnotation,
)
from tests.helpers import parse_model

rng = np.random.default_rng(0)

CONV_RELU_POOL_GEMM = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N,3,8,8] x) => (float[N,10] y) {
  c = Conv <pads=[1,1,1,1]> (x, w, b)
  r = Relu(c)
  p = MaxPool <kernel_shape=[2,2], strides=[2,2]> (r)
  f = Flatten(p)
  y = Gemm <transB=1> (f, fw, fb)
}"""


def conv_relu_pool_gemm(seed: int = 0):
    """The same weights whatever ran before (tests in other modules build it too)."""
    rng = np.random.default_rng(seed)
    return parse_model(
        CONV_RELU_POOL_GEMM,
        dict(
            w=rng.normal(size=(4, 3, 3, 3)).astype(np.float32),
            b=rng.normal(size=4).astype(np.float32),
            fw=rng.normal(size=(10, 64)).astype(np.float32),
            fb=rng.normal(size=10).astype(np.float32),
        ),
    )


def annotate(model, scheme=None):
    common_passes.ShapeInferencePass()(model)
    AnnotatePass(scheme or SchemeOptions())(model)
    values = list(model.graph.inputs) + list(model.graph.initializers.values())
    values += [o for n in model.graph for o in n.outputs]
    return {v.name: v.meta.get(ANNOTATION_KEY) for v in values}, {n.op_type: n.meta[DECISION_KEY] for n in model.graph}


def test_conv_relu_not_split_and_data_movement_shares_qparams():
    ann, decisions = annotate(conv_relu_pool_gemm())
    assert all(d.quantized for d in decisions.values())
    # Not between Conv and Relu: the Relu output carries the qparams.
    assert ann["c"] is None
    assert isinstance(ann["r"], ActivationAnnotation)
    # MaxPool and Flatten outputs share the Relu output's group.
    assert ann["p"].group == ann["r"].group == ann["f"].group
    assert ann["x"].spec.dtype == QuantDType.UINT8 and not ann["x"].spec.symmetric
    # Gemm can return float: the graph output is not rounded again.
    assert ann["y"] is None


def test_weights_biases_and_axes():
    ann, _ = annotate(conv_relu_pool_gemm())
    assert isinstance(ann["w"], WeightAnnotation) and ann["w"].spec.axis == 0
    assert ann["w"].spec.dtype == QuantDType.INT8 and ann["w"].spec.symmetric
    # transB=1: the Gemm weight is (N, K), output channels on axis 0.
    assert ann["fw"].spec.axis == 0
    assert ann["b"] == BiasAnnotation(input="x", weight="w", node="Conv")
    assert isinstance(ann["fb"], BiasAnnotation) and ann["fb"].input == "f"


def test_per_tensor_weights_and_int8_activations():
    scheme = SchemeOptions(activation_dtype="int8", weight_granularity=WeightGranularity.PER_TENSOR)
    ann, _ = annotate(conv_relu_pool_gemm(), scheme)
    assert ann["w"].spec.axis is None and ann["fw"].spec.axis is None
    assert ann["r"].spec.dtype == QuantDType.INT8


def test_unknown_op_stays_float_with_reason():
    model = parse_model(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[1,16] x) => (float[1,16] y) {
          a = MatMul(x, w)
          s = Softmax(a)
          y = MatMul(s, w)
        }""",
        dict(w=rng.normal(size=(16, 16)).astype(np.float32)),
    )
    common_passes.ShapeInferencePass()(model)
    AnnotatePass(SchemeOptions())(model)
    softmax = next(n for n in model.graph if n.op_type == "Softmax")
    decision = softmax.meta[DECISION_KEY]
    assert not decision.quantized and "Softmax is not in the op table" in decision.reason
    ann = {o.name: o.meta.get(ANNOTATION_KEY) for n in model.graph for o in n.outputs}
    # The first MatMul feeds a float op only: its int8 kernel returns float.
    assert ann["a"] is None
    # The second MatMul's input comes from a float op: a float→int boundary.
    assert isinstance(ann["s"], ActivationAnnotation)


def test_keep_float_by_name_pattern_and_op_type():
    model = conv_relu_pool_gemm()
    for node in model.graph:
        node.name = f"layer_{node.op_type.lower()}"
    ann, decisions = annotate(model, SchemeOptions(keep_float=("layer_gem*",)))
    assert not decisions["Gemm"].quantized and "keep_float" in decisions["Gemm"].reason
    assert ann["fw"] is None and ann["fb"] is None
    _, decisions = annotate(conv_relu_pool_gemm(), SchemeOptions(keep_float=("Conv",)))
    assert not decisions["Conv"].quantized
    # Its Relu has nothing quantized to follow.
    assert not decisions["Relu"].quantized


def test_concat_inputs_share_one_group_and_constant_operand():
    model = parse_model(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[1,4,8,8] x) => (float[1,4,8,8] y) {
          a = Conv (x, w1)
          b = Sigmoid(x)
          c = Concat <axis=1> (a, b)
          s = Add(c, k)
          y = Conv (s, w2)
        }""",
        dict(
            w1=rng.normal(size=(4, 4, 1, 1)).astype(np.float32), k=rng.normal(size=(1, 8, 1, 1)).astype(np.float32),
            w2=rng.normal(size=(4, 8, 1, 1)).astype(np.float32),
        ),
    )
    ann, decisions = annotate(model)
    assert decisions["Concat"].quantized
    assert ann["a"].group == ann["b"].group == ann["c"].group
    assert isinstance(ann["k"], ConstantAnnotation)
    assert isinstance(ann["s"], ActivationAnnotation)


def test_elementwise_and_data_movement_feeding_only_float_ops_stay_float():
    """A residual Add before LayerNormalization, a bias Add after a MatMul: no int8 consumer, no Q/DQ."""
    model = parse_model(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[1,6,16] x) => (float[1,6,16] y) {
          m = MatMul(x, w)
          a = Add(m, bias)
          r = Reshape(a, shape)
          s = Add(r, x)
          y = LayerNormalization <axis=-1> (s, gamma, beta)
        }""",
        dict(
            w=rng.normal(size=(16, 16)).astype(np.float32), bias=rng.normal(size=16).astype(np.float32),
            shape=np.array([1, 6, 16], np.int64), gamma=np.ones(16, np.float32), beta=np.zeros(16, np.float32),
        ),
    )
    ann, decisions = annotate(model)
    assert decisions["MatMul"].quantized
    assert not decisions["Add"].quantized and "feeds only float ops" in decisions["Add"].reason
    assert not decisions["Reshape"].quantized
    # The MatMul's int8 kernel returns float to its float bias Add (MatMulIntegerToFloat).
    assert ann["m"] is None and ann["a"] is None and ann["s"] is None
    assert isinstance(ann["x"], ActivationAnnotation)


@pytest.mark.parametrize("group, expected_axis", [(1, 1), (2, None)])
def test_conv_transpose_weight_axis(group, expected_axis):
    model = parse_model(
        f"""<ir_version: 8, opset_import: ["" : 17]>
        g (float[1,4,5,5] x) => (float[1,6,6,6] y) {{
          y = ConvTranspose <group={group}, kernel_shape=[2,2]> (x, w, b)
        }}""",
        dict(w=rng.normal(size=(4, 6 // group, 2, 2)).astype(np.float32), b=rng.normal(size=6).astype(np.float32)),
    )
    ann, _ = annotate(model)
    assert ann["w"].spec.axis == expected_axis
    assert isinstance(ann["b"], BiasAnnotation)


GELU_FFN = """<ir_version: 8, opset_import: ["" : 17]>
g (float[1,6,16] x) => (float[1,6,16] y) {
  m = MatMul(x, w1)
  h = Add(m, b1)
  d = Div(h, sqrt2)
  e = Erf(d)
  e1 = Add(e, one)
  g1 = Mul(h, e1)
  g2 = Mul(g1, half)
  y = MatMul(g2, w2)
}"""


def test_gelu_add_mul_without_int8_operand_stay_float():
    """Erf's output and the float bias Add feed GELU's Add/Mul: no operand is int8, so they stay float."""
    from qcompile.passes.annotate import NO_INT8_OPERAND

    model = parse_model(
        GELU_FFN,
        dict(
            w1=rng.normal(size=(16, 16)).astype(np.float32), b1=rng.normal(size=16).astype(np.float32),
            sqrt2=np.array(1.4142135, np.float32), one=np.array(1.0, np.float32), half=np.array(0.5, np.float32),
            w2=rng.normal(size=(16, 16)).astype(np.float32),
        ),
    )
    ann, _ = annotate(model)
    elementwise = [n for n in model.graph if n.op_type in ("Add", "Mul")]
    assert len(elementwise) == 4
    # The bias Add feeds no int8 op; GELU's Add and Muls have no int8 operand.
    reasons = [n.meta[DECISION_KEY].reason for n in elementwise]
    assert reasons.count(NO_INT8_OPERAND) == 3
    assert not any(n.meta[DECISION_KEY].quantized for n in elementwise)
    # One float→int boundary, before the second MatMul; nothing inside the GELU is rounded.
    assert isinstance(ann["g2"], ActivationAnnotation)
    assert all(ann[name] is None for name in ("h", "e", "e1", "g1"))


def test_activation_times_activation_matmul_stays_float_on_request():
    """quantize_activation_matmuls=False: attention's Q·Kᵀ gets no int8 MatMul and no Q/DQ on either operand."""
    from qcompile.passes.annotate import ACTIVATION_MATMUL

    model = parse_model(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[1,6,16] x) => (float[1,6,16] y) {
          q = MatMul(x, wq)
          k = MatMul(x, wk)
          kt = Transpose <perm=[0,2,1]> (k)
          s = MatMul(q, kt)
          y = MatMul(s, x)
        }""",
        dict(wq=rng.normal(size=(16, 16)).astype(np.float32), wk=rng.normal(size=(16, 16)).astype(np.float32)),
    )
    ann, _ = annotate(model, SchemeOptions(quantize_activation_matmuls=False))
    by_output = {n.outputs[0].name: n.meta[DECISION_KEY] for n in model.graph}
    assert by_output["q"].quantized and by_output["k"].quantized
    assert by_output["s"].reason == ACTIVATION_MATMUL and by_output["y"].reason == ACTIVATION_MATMUL
    assert not by_output["kt"].quantized
    assert ann["q"] is None and ann["k"] is None and ann["kt"] is None
