"""EqualizeCrossLayerPass: the float model's outputs stay, the ranges balance, quantized error falls."""

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import qcompile
from qcompile.graph.notes import notes
from qcompile.passes.equalize_cross_layer import EqualizeCrossLayerPass
from tests.helpers import assert_numerically_close, parse_model, run, sqnr_db

HEADER = '<ir_version: 8, opset_import: ["" : 17]>'
rng = np.random.default_rng(0)


def _f32(*shape: int, spread: bool = False) -> np.ndarray:
    """Random weights; ``spread`` gives each row (axis 0) a range between 0.01 and 10."""
    w = rng.standard_normal(shape)
    if spread:
        w *= 10.0 ** rng.uniform(-2, 1, size=(shape[0],) + (1,) * (len(shape) - 1))
    return w.astype(np.float32)


CONV_TWO = HEADER + """
g (float[2,4,8,8] x) => (float[2,6,8,8] y) {{
  h = Conv <pads=[1,1,1,1]> (x, w1, b1)
  {mid}
  y = Conv <pads=[1,1,1,1], group={group}> ({between}, w2, b2)
}}"""

# name → (graph text, initializers, feeds): one chain each, through every supported middle.
CHAINS = {
    "relu": (CONV_TWO.format(mid="a = Relu (h)", group=1, between="a"), dict(w1=_f32(8, 4, 3, 3, spread=True), w2=_f32(6, 8, 3, 3))),
    "leaky_relu_grouped": (
        CONV_TWO.format(mid="a = LeakyRelu <alpha=0.1> (h)", group=2, between="a"),
        dict(w1=_f32(8, 4, 3, 3, spread=True), w2=_f32(6, 4, 3, 3)),
    ),
    "maxpool": (
        CONV_TWO.format(mid="r = Relu (h)\n  a = MaxPool <kernel_shape=[3,3], pads=[1,1,1,1]> (r)", group=1, between="a"),
        dict(w1=_f32(8, 4, 3, 3, spread=True), w2=_f32(6, 8, 3, 3)),
    ),
    "nothing": (CONV_TWO.format(mid="", group=1, between="h"), dict(w1=_f32(8, 4, 3, 3, spread=True), w2=_f32(6, 8, 3, 3))),
}
for _name, (_text, _inits) in CHAINS.items():
    _inits.update(b1=_f32(8), b2=_f32(6))

# Depthwise layer 2 (its channels map 1:1) behind a per-channel PRelu.
CHAINS["prelu_depthwise"] = (
    f"""{HEADER}
g (float[2,4,8,8] x) => (float[2,8,8,8] y) {{
  h = Conv <pads=[1,1,1,1]> (x, w1, b1)
  a = PRelu (h, slope)
  y = Conv <pads=[1,1,1,1], group=8> (a, w2, b2)
}}""",
    dict(w1=_f32(8, 4, 3, 3, spread=True), b1=_f32(8), slope=(0.2 * _f32(8, 1, 1)), w2=_f32(8, 1, 3, 3), b2=_f32(8)),
)
CHAINS["gemm"] = (
    f"""{HEADER}
g (float[5,4] x) => (float[5,3] y) {{
  h = Gemm <transB=1, beta=0.5> (x, w1, c1)
  a = Relu (h)
  y = Gemm (a, w2, c2)
}}""",
    dict(w1=_f32(8, 4, spread=True), c1=_f32(1, 8), w2=_f32(8, 3), c2=_f32(3)),
)
CHAINS["matmul_add"] = (
    f"""{HEADER}
g (float[2,5,4] x) => (float[2,5,3] y) {{
  m = MatMul (x, w1)
  h = Add (m, b1)
  a = Relu (h)
  y = MatMul (a, w2)
}}""",
    dict(w1=_f32(8, 4, spread=True).T.copy(), b1=_f32(8), w2=_f32(8, 3)),
)


def _input_feed(model: ir.Model) -> dict[str, np.ndarray]:
    x = model.graph.inputs[0]
    return {x.name: np.random.default_rng(1).standard_normal([int(d) for d in x.shape]).astype(np.float32)}


@pytest.mark.parametrize("name", sorted(CHAINS))
def test_float_outputs_unchanged_and_ranges_balanced(name):
    text, inits = CHAINS[name]
    original, model = parse_model(text, inits), parse_model(text, inits)
    result = EqualizeCrossLayerPass()(model)
    assert result.modified
    assert any("equalized" in note for note in notes(model))
    onnx.checker.check_model(ir.to_proto(model))
    assert_numerically_close(original, model, _input_feed(original), rtol=1e-5, atol_rel=1e-5)
    # The first layer's weights changed (its channels had ranges from 0.01 to 10).
    first = next(n for n in model.graph if n.op_type in ("Conv", "Gemm", "MatMul"))
    assert not np.allclose(first.inputs[1].const_value.numpy(), inits["w1"])


def test_ranges_are_equal_after_a_three_layer_chain_converges():
    text = f"""{HEADER}
g (float[1,4,6,6] x) => (float[1,5,6,6] y) {{
  h1 = Conv <pads=[1,1,1,1]> (x, w1)
  a1 = Relu (h1)
  h2 = Conv <pads=[1,1,1,1]> (a1, w2)
  a2 = Relu (h2)
  y = Conv <pads=[1,1,1,1]> (a2, w3)
}}"""
    inits = dict(w1=_f32(8, 4, 3, 3, spread=True), w2=_f32(7, 8, 3, 3, spread=True), w3=_f32(5, 7, 3, 3))
    original, model = parse_model(text, inits), parse_model(text, inits)
    assert EqualizeCrossLayerPass()(model).modified
    assert_numerically_close(original, model, _input_feed(original))
    w1, w2, w3 = (n.inputs[1].const_value.numpy().astype(np.float64) for n in model.graph if n.op_type == "Conv")
    # Output channel i of one layer and input channel i of the next: equal ranges (to the tolerance).
    np.testing.assert_allclose(np.abs(w1).max(axis=(1, 2, 3)), np.abs(w2).max(axis=(0, 2, 3)), rtol=5e-3)
    np.testing.assert_allclose(np.abs(w2).max(axis=(1, 2, 3)), np.abs(w3).max(axis=(0, 2, 3)), rtol=5e-3)


@pytest.mark.parametrize(
    "mid, reason",
    [
        ("a = Clip (h, zero, six)", "Clip (ReLU6) is not positive-homogeneous"),
        ("a = Relu (h)\n  extra = Sigmoid (a)", "has 2 readers"),
        ("a = Relu (h)", "is a graph output"),
    ],
    ids=["clip", "another_reader", "graph_output"],
)
def test_declines_with_a_reason(mid, reason):
    outputs = "float[2,6,8,8] y"
    if "extra" in mid:
        outputs += ", float[2,8,8,8] extra"
    elif reason.endswith("graph output"):
        outputs += ", float[2,8,8,8] a"
    text = CONV_TWO.format(mid=mid, group=1, between="a").replace("float[2,6,8,8] y", outputs)
    inits = dict(CHAINS["relu"][1], zero=np.float32(0.0), six=np.float32(6.0))
    model = parse_model(text, inits)
    assert not EqualizeCrossLayerPass()(model).modified
    assert [n for n in notes(model) if reason in n and "declined" in n]
    np.testing.assert_array_equal(model.graph.initializers["w1"].const_value.numpy(), inits["w1"])


def _compile(model: onnx.ModelProto, calib, **calibration) -> onnx.ModelProto:
    options = qcompile.CompileOptions(
        scheme=qcompile.SchemeOptions(weight_granularity="per_tensor"),
        calibration=qcompile.CalibrationOptions(**calibration),
        verification=qcompile.VerificationOptions(enabled=False),
        show_progress=False,
    )
    return qcompile.compile_model(model, calib, options).model


def test_equalization_reduces_per_tensor_quantized_error_and_off_restores_the_old_output():
    # Layer 1's output channels span ranges 0.01..10 (layer 2 compensates, as BN folding often
    # leaves it): one per-tensor weight scale rounds the small channels away.
    text, inits = CHAINS["relu"]
    inits = dict(inits)
    spread = np.abs(inits["w1"]).max(axis=(1, 2, 3))
    inits["w2"] = (inits["w2"] / spread[None, :, None, None]).astype(np.float32)
    model = ir.to_proto(parse_model(text, inits))
    data = np.random.default_rng(2).standard_normal((12, 2, 4, 8, 8)).astype(np.float32)
    calib, held_out = [{"x": d} for d in data[:8]], [{"x": d} for d in data[8:]]

    def error(quantized):
        ref = np.concatenate([run(model, f)[0] for f in held_out])
        return sqnr_db(ref, np.concatenate([run(quantized, f)[0] for f in held_out]))

    plain, equalized = _compile(model, calib), _compile(model, calib, equalize_cross_layer=True)
    assert error(equalized) > error(plain) + 10.0
    # Off is the old compile, byte for byte.
    assert _compile(model, calib, equalize_cross_layer=False).SerializeToString() == plain.SerializeToString()
