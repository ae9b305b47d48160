import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common
import pytest

from qcompile.graph.notes import notes
from qcompile.passes.decompose_batchnorm import DecomposeBatchNormPass
from tests.helpers import assert_numerically_close, count_ops, parse_model, run

HEADER = '<ir_version: 8, opset_import: ["" : 15]>'


def _bn_params(channels: int) -> dict[str, np.ndarray]:
    """Non-trivial BN parameters: γ of both signs, β, μ, and a positive σ²."""
    rng = np.random.default_rng(0)
    return {
        "gamma": (rng.uniform(0.5, 2.0, channels) * rng.choice([-1, 1], channels)).astype(np.float32),
        "beta": rng.standard_normal(channels).astype(np.float32),
        "mean": rng.standard_normal(channels).astype(np.float32),
        "var": rng.uniform(0.1, 3.0, channels).astype(np.float32),
    }


def _decompose(
    text: str, initializers: dict[str, np.ndarray], *, infer_shapes: bool = False
) -> tuple[ir.Model, ir.Model, bool]:
    """(original, decomposed, modified); the pass mutates, so the original is parsed separately."""
    original = parse_model(text, initializers)
    model = parse_model(text, initializers)
    if infer_shapes:
        # The pipeline runs shape inference first; intermediate values have no shape without it.
        model = onnx_ir.passes.common.ShapeInferencePass()(model).model
    result = DecomposeBatchNormPass()(model)
    onnx.checker.check_model(ir.to_proto(result.model))
    return original, result.model, result.modified


def _feeds(shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(1).standard_normal(shape).astype(np.float32)}


@pytest.mark.parametrize("shape", [(4, 3), (2, 3, 5), (2, 3, 4, 4), (1, 3, 2, 3, 2)])
def test_graph_input_of_each_rank(shape):
    dims = ",".join(map(str, shape))
    text = f"""{HEADER}
        g (float[{dims}] x) => (float[{dims}] z) {{
            y = BatchNormalization<epsilon = 0.001>(x, gamma, beta, mean, var)
            z = Neg(y)
        }}"""
    original, decomposed, modified = _decompose(text, _bn_params(3))
    assert modified
    assert count_ops(decomposed) == {"Mul": 1, "Add": 1, "Neg": 1}
    mul = next(n for n in decomposed.graph if n.op_type == "Mul")
    assert mul.inputs[1].shape == ir.Shape((3,) + (1,) * (len(shape) - 2))
    assert_numerically_close(original, decomposed, _feeds(shape))


def test_after_relu_with_inferred_shapes():
    text = f"""{HEADER}
        g (float[2,3,4,4] x) => (float[2,3,4,4] y) {{
            h = Relu(x)
            z = BatchNormalization(h, gamma, beta, mean, var)
            y = Neg(z)
        }}"""
    original, decomposed, modified = _decompose(text, _bn_params(3), infer_shapes=True)
    assert modified
    assert count_ops(decomposed) == {"Relu": 1, "Mul": 1, "Add": 1, "Neg": 1}
    assert_numerically_close(original, decomposed, _feeds((2, 3, 4, 4)))


def test_bn_as_graph_output_keeps_name():
    # No shape inference: the declared graph output gives the rank.
    text = f"""{HEADER}
        g (float[2,3,4,4] x) => (float[2,3,4,4] y) {{
            h = Relu(x)
            y = BatchNormalization(h, gamma, beta, mean, var)
        }}"""
    original, decomposed, modified = _decompose(text, _bn_params(3))
    assert modified
    assert count_ops(decomposed) == {"Relu": 1, "Mul": 1, "Add": 1}
    assert [o.name for o in decomposed.graph.outputs] == ["y"]
    assert decomposed.graph.outputs[0].producer().op_type == "Add"
    assert_numerically_close(original, decomposed, _feeds((2, 3, 4, 4)))


def test_dynamic_batch_dimension_is_fine():
    text = f"""{HEADER}
        g (float[N,3,4] x) => (float[N,3,4] y) {{
            y = BatchNormalization(x, gamma, beta, mean, var)
        }}"""
    original, decomposed, modified = _decompose(text, _bn_params(3))
    assert modified
    assert count_ops(decomposed)["BatchNormalization"] == 0
    assert_numerically_close(original, decomposed, _feeds((5, 3, 4)))


def test_unknown_rank_declined_with_note():
    text = f"""{HEADER}
        g (float[2,3,4,4] x) => (float[2,3,4,4] y) {{
            h = Relu(x)
            z = BatchNormalization(h, gamma, beta, mean, var)
            y = Neg(z)
        }}"""
    _, decomposed, modified = _decompose(text, _bn_params(3))
    assert not modified
    assert count_ops(decomposed)["BatchNormalization"] == 1
    assert any("rank is unknown" in n for n in notes(decomposed))


def test_non_constant_mean_declined_with_note():
    params = _bn_params(3)
    del params["mean"]
    text = f"""{HEADER}
        g (float[2,3,4] x, float[3] mean) => (float[2,3,4] y) {{
            y = BatchNormalization(x, gamma, beta, mean, var)
        }}"""
    _, decomposed, modified = _decompose(text, params)
    assert not modified
    assert count_ops(decomposed)["BatchNormalization"] == 1
    assert any("input_mean" in n and "not a constant" in n for n in notes(decomposed))


def test_float16_input_keeps_dtype():
    params = {k: v.astype(np.float16) for k, v in _bn_params(3).items()}
    text = f"""{HEADER}
        g (float16[2,3,4] x) => (float16[2,3,4] y) {{
            y = BatchNormalization(x, gamma, beta, mean, var)
        }}"""
    _, decomposed, modified = _decompose(text, params)
    assert modified
    mul = next(n for n in decomposed.graph if n.op_type == "Mul")
    assert mul.inputs[1].dtype == ir.DataType.FLOAT16
    # onnxruntime's CPU BatchNormalization has no float16 kernel, so compare with numpy in float64.
    x = np.random.default_rng(1).standard_normal((2, 3, 4)).astype(np.float16)
    p = {k: v.astype(np.float64)[None, :, None] for k, v in params.items()}
    expected = p["gamma"] * (x.astype(np.float64) - p["mean"]) / np.sqrt(p["var"] + 1e-5) + p["beta"]
    actual = run(decomposed, {"x": x})[0]
    np.testing.assert_allclose(actual, expected, rtol=5e-3, atol=5e-3 * np.abs(expected).max())
