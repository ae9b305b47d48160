"""RoundWeightsPass: at most one step from nearest, lower output error on held-out data, off is the old model."""

import numpy as np
import onnx
import pytest

import qcompile
from qcompile.passes.round_weights import _conv_patches
from tests.helpers import parse_model, run

HEADER = '<ir_version: 8, opset_import: ["" : 17]>'

GEMM = f"""{HEADER}
g (float[32,48] x) => (float[32,16] y) {{
  y = Gemm (x, w, b)
}}"""
CONV = f"""{HEADER}
g (float[4,8,8,8] x) => (float[4,12,8,8] y) {{
  y = Conv <pads=[1,1,1,1], group=2> (x, w, b)
}}"""


def _case(kind: str, seed: int = 0):
    """A layer built to need it: one large weight per output channel makes the int8 step coarse for
    the others, and strongly correlated inputs make their rounding errors add up in the output,
    which nearest rounding ignores and the optimized rounding can cancel."""
    rng = np.random.default_rng(seed)
    if kind == "gemm":
        text, weights = GEMM, dict(w=rng.standard_normal((48, 16)), b=rng.standard_normal(16))
        weights["w"][0] += 8.0
        mixing = rng.standard_normal((6, 48))

        def batch():
            return {"x": (rng.uniform(-1, 1, (32, 6)) @ mixing + 0.1 * rng.uniform(-1, 1, (32, 48))).astype(np.float32)}
    else:
        text, weights = CONV, dict(w=rng.standard_normal((12, 4, 3, 3)), b=rng.standard_normal(12))
        weights["w"][:, 0, 0, 0] += 8.0

        mixing = rng.standard_normal((8, 2))

        def batch():
            # Smooth images of two underlying channels: the inputs of one output move together.
            coarse = np.einsum("ck,nkhw->nchw", mixing, rng.uniform(-1, 1, (4, 2, 2, 2))).repeat(4, axis=2).repeat(4, axis=3)
            return {"x": (coarse + 0.1 * rng.uniform(-1, 1, (4, 8, 8, 8))).astype(np.float32)}

    model = onnx.parser.parse_model(text)
    model.graph.initializer.extend(onnx.numpy_helper.from_array(a.astype(np.float32), n) for n, a in weights.items())
    return model, [batch() for _ in range(8)], [batch() for _ in range(4)]


def _compile(model, calib, rounding: str | None) -> qcompile.CompileResult:
    calibration = qcompile.CalibrationOptions() if rounding is None else qcompile.CalibrationOptions(weight_rounding=rounding)
    # SmoothQuant off: the tests compare the stored integers with the model's own weights / scale.
    options = qcompile.CompileOptions(
        calibration=calibration, smooth_quant=qcompile.SmoothQuantOptions(enabled=False),
        verification=qcompile.VerificationOptions(enabled=False), show_progress=False,
    )
    return qcompile.compile_model(model, calib, options)


def _weights(model: onnx.ModelProto) -> tuple[np.ndarray, np.ndarray]:
    """The stored int8 weight and its scale (the DequantizeLinear feeding the layer's input 1)."""
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    produced = {o: n for n in model.graph.node for o in n.output}
    layer = next(n for n in model.graph.node if n.op_type in ("Conv", "Gemm"))
    dq = produced[layer.input[1]]
    return inits[dq.input[0]], inits[dq.input[1]]


def _output_mse(reference, quantized, feeds) -> float:
    return float(np.mean([np.mean((run(reference, f)[0] - run(quantized, f)[0]) ** 2) for f in feeds]))


@pytest.mark.parametrize("kind", ["gemm", "conv"])
def test_optimized_rounding_lowers_held_out_output_error(kind):
    model, calib, held_out = _case(kind)
    nearest, optimized = _compile(model, calib, None), _compile(model, calib, "optimized")
    assert "round_weights" in [p.name for p in optimized.report.passes]
    assert _output_mse(model, optimized.model, held_out) < 0.8 * _output_mse(model, nearest.model, held_out)


@pytest.mark.parametrize("kind", ["gemm", "conv"])
def test_rounded_weights_are_at_most_one_step_from_nearest(kind):
    model, calib, _ = _case(kind)
    q_nearest, scale = _weights(_compile(model, calib, None).model)
    q_optimized, scale_optimized = _weights(_compile(model, calib, "optimized").model)
    np.testing.assert_array_equal(scale, scale_optimized)  # only the integers change
    w = onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "w"))
    axis = 1 if kind == "gemm" else 0
    shape = [1] * w.ndim
    shape[axis] = -1
    v = w / scale.reshape(shape)
    np.testing.assert_array_equal(q_nearest, np.clip(np.rint(v), -128, 127))
    assert np.all((q_optimized == np.floor(v)) | (q_optimized == np.ceil(v)))
    assert np.max(np.abs(q_optimized.astype(int) - q_nearest)) == 1


def test_off_gives_the_old_model_byte_for_byte():
    model, calib, _ = _case("conv")
    default, nearest = _compile(model, calib, None), _compile(model, calib, "nearest")
    assert default.model.SerializeToString() == nearest.model.SerializeToString()
    assert "round_weights" not in [p.name for p in nearest.report.passes]


@pytest.mark.parametrize(
    "attributes, weight_shape, x_shape",
    [
        ("pads=[1,0,2,1], strides=[2,1], group=2", (6, 2, 3, 2), (2, 4, 7, 6)),
        ("dilations=[2,2], group=4", (4, 1, 3, 3), (1, 4, 9, 9)),
        ("pads=[2,1], strides=[2]", (3, 5, 4), (2, 5, 11)),
    ],
    ids=["strided_grouped", "dilated_depthwise", "conv1d"],
)
def test_conv_patches_reproduce_the_convolution(attributes, weight_shape, x_shape):
    # Over every output position, Σ y_o² = w_oᵀ H w_o with H the Gram matrix of the sampled rows:
    # checks the im2col layout against onnxruntime's convolution, whatever order rows come in.
    rng = np.random.default_rng(3)
    w = rng.standard_normal(weight_shape).astype(np.float32)
    x = rng.standard_normal(x_shape).astype(np.float32)
    dims = ",".join(["N"] + [str(d) for d in x_shape[1:]])
    model = parse_model(f"{HEADER}\ng (float[{dims}] x) => (float y) {{\n  y = Conv <{attributes}> (x, w)\n}}", {"w": w})
    node = next(iter(model.graph))
    y = run(model, {"x": x})[0].astype(np.float64)
    positions = y.shape[0] * int(np.prod(y.shape[2:]))
    rows = _conv_patches(node, x, positions, np.random.default_rng(0)).astype(np.float64)
    group = rows.shape[0]
    assert rows.shape[1] == positions
    gram = np.matmul(rows.transpose(0, 2, 1), rows)
    per_group = w.reshape(group, weight_shape[0] // group, -1).astype(np.float64)
    energy = np.einsum("gon,gnm,gom->go", per_group, gram, per_group).reshape(-1)
    np.testing.assert_allclose(energy, np.sum(y**2, axis=(0, *range(2, y.ndim))), rtol=1e-6)


def test_a_shared_weight_keeps_nearest_rounding_with_a_note():
    text = f"""{HEADER}
g (float[32,48] x) => (float[32,16] y, float[32,16] z) {{
  y = Gemm (x, w)
  z = Gemm (x, w)
}}"""
    model, calib, _ = _case("gemm")
    shared = onnx.parser.parse_model(text)
    shared.graph.initializer.extend(t for t in model.graph.initializer if t.name == "w")
    nearest, optimized = _compile(shared, calib, None), _compile(shared, calib, "optimized")
    notes = [n for p in optimized.report.passes if p.name == "round_weights" for n in p.notes]
    assert any("shared" in n for n in notes), notes
    # The same initializers (the model metadata differs: it records the options).
    assert list(optimized.model.graph.initializer) == list(nearest.model.graph.initializer)
