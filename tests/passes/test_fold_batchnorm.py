import numpy as np
import onnx
import onnx_ir as ir
import pytest

from qcompile.graph.notes import notes
from qcompile.passes.decompose_batchnorm import DecomposeBatchNormPass
from qcompile.passes.fold_batchnorm import FoldBatchNormPass
from tests.helpers import assert_numerically_close, count_ops, parse_model

HEADER = '<ir_version: 8, opset_import: ["" : 15]>'


def _bn_params(rng: np.random.Generator, channels: int, prefix: str = "") -> dict[str, np.ndarray]:
    """Non-trivial BN parameters: γ of both signs, β, μ, and a positive σ²."""
    return {
        f"{prefix}gamma": (rng.uniform(0.5, 2.0, channels) * rng.choice([-1, 1], channels)).astype(np.float32),
        f"{prefix}beta": rng.standard_normal(channels).astype(np.float32),
        f"{prefix}mean": rng.standard_normal(channels).astype(np.float32),
        f"{prefix}var": rng.uniform(0.1, 3.0, channels).astype(np.float32),
    }


def _bn(x: str, y: str, prefix: str = "") -> str:
    p = prefix
    return f"{y} = BatchNormalization<epsilon = 0.001>({x}, {p}gamma, {p}beta, {p}mean, {p}var)"


def _fold(text: str, initializers: dict[str, np.ndarray]) -> tuple[ir.Model, ir.Model, bool]:
    """(original, folded, modified); the pass mutates, so the original is parsed separately."""
    original = parse_model(text, initializers)
    result = FoldBatchNormPass()(parse_model(text, initializers))
    onnx.checker.check_model(ir.to_proto(result.model))
    return original, result.model, result.modified


def _feeds(**shapes: tuple[int, ...]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("group", [1, 4])
def test_conv(with_bias, group):
    rng = np.random.default_rng(0)
    out_channels = 4 if group == 4 else 6  # group=4 is depthwise over the 4 input channels
    inits = {
        "w": rng.standard_normal((out_channels, 4 // group, 3, 3)).astype(np.float32),
        **_bn_params(rng, out_channels),
    }
    bias = ", b" if with_bias else ""
    if with_bias:
        inits["b"] = rng.standard_normal(out_channels).astype(np.float32)
    text = f"""{HEADER}
        g (float[2,4,6,6] x) => (float[2,{out_channels},6,6] y) {{
            c = Conv<group = {group}, pads = [1,1,1,1]>(x, w{bias})
            {_bn("c", "n")}
            y = Relu(n)
        }}"""
    original, folded, modified = _fold(text, inits)
    assert modified
    assert count_ops(folded) == {"Conv": 1, "Relu": 1}
    conv = next(iter(folded.graph))
    assert len(conv.inputs) == 3 and conv.inputs[2] is not None
    assert conv.inputs[1].dtype == ir.DataType.FLOAT
    assert_numerically_close(original, folded, _feeds(x=(2, 4, 6, 6)))


@pytest.mark.parametrize("group", [1, 2])
def test_conv_transpose(group):
    rng = np.random.default_rng(0)
    c_in, c_out = 4, 6
    inits = {
        "w": rng.standard_normal((c_in, c_out // group, 3, 3)).astype(np.float32),
        "b": rng.standard_normal(c_out).astype(np.float32),
        **_bn_params(rng, c_out),
    }
    text = f"""{HEADER}
        g (float[1,4,5,5] x) => (float[1,6,11,11] y) {{
            c = ConvTranspose<group = {group}, strides = [2,2]>(x, w, b)
            {_bn("c", "y")}
        }}"""
    original, folded, modified = _fold(text, inits)
    assert modified
    assert count_ops(folded) == {"ConvTranspose": 1}
    assert_numerically_close(original, folded, _feeds(x=(1, 4, 5, 5)))


def test_conv_transpose_group2_without_bias():
    rng = np.random.default_rng(3)
    inits = {"w": rng.standard_normal((4, 3, 2, 2)).astype(np.float32), **_bn_params(rng, 6)}
    text = f"""{HEADER}
        g (float[1,4,3,3] x) => (float[1,6,4,4] y) {{
            c = ConvTranspose<group = 2>(x, w)
            {_bn("c", "y")}
        }}"""
    original, folded, modified = _fold(text, inits)
    assert modified
    assert count_ops(folded) == {"ConvTranspose": 1}
    assert_numerically_close(original, folded, _feeds(x=(1, 4, 3, 3)))


@pytest.mark.parametrize("trans_b", [0, 1])
@pytest.mark.parametrize("c_shape", [None, (), (3,), (1, 3), (5, 1), (5, 3)])
def test_gemm(trans_b, c_shape):
    rng = np.random.default_rng(0)
    b_shape = (3, 4) if trans_b else (4, 3)
    inits = {"bm": rng.standard_normal(b_shape).astype(np.float32), **_bn_params(rng, 3)}
    c_input = ""
    if c_shape is not None:
        inits["cm"] = np.asarray(rng.standard_normal(c_shape), dtype=np.float32)
        c_input = ", cm"
    text = f"""{HEADER}
        g (float[5,4] a) => (float[5,3] y) {{
            h = Gemm<alpha = 0.7, beta = 1.3, transB = {trans_b}>(a, bm{c_input})
            {_bn("h", "y")}
        }}"""
    original, folded, modified = _fold(text, inits)
    assert modified
    assert count_ops(folded) == {"Gemm": 1}
    assert_numerically_close(original, folded, _feeds(a=(5, 4)))


def test_gemm_trans_a_and_beta_zero():
    rng = np.random.default_rng(5)
    inits = {
        "bm": rng.standard_normal((4, 3)).astype(np.float32),
        "cm": rng.standard_normal(3).astype(np.float32),
        **_bn_params(rng, 3),
    }
    text = f"""{HEADER}
        g (float[4,5] a) => (float[5,3] y) {{
            h = Gemm<alpha = 2.0, beta = 0.0, transA = 1>(a, bm, cm)
            {_bn("h", "y")}
        }}"""
    original, folded, modified = _fold(text, inits)
    assert modified
    assert count_ops(folded) == {"Gemm": 1}
    assert_numerically_close(original, folded, _feeds(a=(4, 5)))


def test_gemm_double_keeps_dtype():
    rng = np.random.default_rng(6)
    params = {k: v.astype(np.float64) for k, v in _bn_params(rng, 3).items()}
    inits = {"bm": rng.standard_normal((4, 3)), **params}
    text = f"""{HEADER}
        g (double[5,4] a) => (double[5,3] y) {{
            h = Gemm(a, bm)
            {_bn("h", "y")}
        }}"""
    original, folded, modified = _fold(text, inits)
    assert modified
    gemm = next(iter(folded.graph))
    assert gemm.inputs[1].dtype == gemm.inputs[2].dtype == ir.DataType.DOUBLE
    assert_numerically_close(original, folded, {"a": np.random.default_rng(1).standard_normal((5, 4))})


def test_matmul_2d_gets_weight_scaled_and_add():
    rng = np.random.default_rng(0)
    inits = {"bm": rng.standard_normal((4, 3)).astype(np.float32), **_bn_params(rng, 3)}
    text = f"""{HEADER}
        g (float[5,4] a) => (float[5,3] y) {{
            h = MatMul(a, bm)
            {_bn("h", "y")}
        }}"""
    original, folded, modified = _fold(text, inits)
    assert modified
    assert count_ops(folded) == {"MatMul": 1, "Add": 1}
    assert [o.name for o in folded.graph.outputs] == ["y"]
    assert_numerically_close(original, folded, _feeds(a=(5, 4)))


def test_matmul_3d_not_folded():
    # Output (2, 5, 5): BN's channel axis 1 is not MatMul's column axis, even though both are 5 long.
    rng = np.random.default_rng(0)
    inits = {"bm": rng.standard_normal((4, 5)).astype(np.float32), **_bn_params(rng, 5)}
    text = f"""{HEADER}
        g (float[2,5,4] a) => (float[2,5,5] y) {{
            h = MatMul(a, bm)
            {_bn("h", "y")}
        }}"""
    _, folded, modified = _fold(text, inits)
    assert not modified
    assert count_ops(folded) == {"MatMul": 1, "BatchNormalization": 1}
    assert notes(folded) == []  # left for DecomposeBatchNormPass, not a decline


def test_producer_with_two_consumers_not_folded_then_decomposed():
    rng = np.random.default_rng(0)
    inits = {"w": rng.standard_normal((3, 2, 1, 1)).astype(np.float32), **_bn_params(rng, 3)}
    text = f"""{HEADER}
        g (float[1,2,4,4] x) => (float[1,3,4,4] y, float[1,3,4,4] r) {{
            c = Conv(x, w)
            {_bn("c", "y")}
            r = Relu(c)
        }}"""
    original, folded, modified = _fold(text, inits)
    assert not modified
    assert count_ops(folded) == {"Conv": 1, "BatchNormalization": 1, "Relu": 1}
    decomposed = DecomposeBatchNormPass()(folded)
    assert decomposed.modified
    assert count_ops(folded) == {"Conv": 1, "Mul": 1, "Add": 1, "Relu": 1}
    assert_numerically_close(original, folded, _feeds(x=(1, 2, 4, 4)))


def test_shared_weight_two_folds_do_not_interfere():
    rng = np.random.default_rng(0)
    inits = {
        "w": rng.standard_normal((3, 2, 3, 3)).astype(np.float32),
        **_bn_params(rng, 3, "p"),
        **_bn_params(rng, 3, "q"),
    }
    text = f"""{HEADER}
        g (float[1,2,5,5] x) => (float[1,3,3,3] y1, float[1,3,3,3] y2) {{
            c1 = Conv(x, w)
            c2 = Conv(x, w)
            {_bn("c1", "y1", "p")}
            {_bn("c2", "y2", "q")}
        }}"""
    original, folded, modified = _fold(text, inits)
    assert modified
    assert count_ops(folded) == {"Conv": 2}
    assert [o.name for o in folded.graph.outputs] == ["y1", "y2"]
    assert all(o.producer().op_type == "Conv" for o in folded.graph.outputs)
    assert_numerically_close(original, folded, _feeds(x=(1, 2, 5, 5)))


def test_bn_after_relu_not_folded():
    rng = np.random.default_rng(0)
    text = f"""{HEADER}
        g (float[1,3,4,4] x) => (float[1,3,4,4] y) {{
            h = Relu(x)
            {_bn("h", "y")}
        }}"""
    _, folded, modified = _fold(text, _bn_params(rng, 3))
    assert not modified
    assert count_ops(folded)["BatchNormalization"] == 1


def test_training_mode_declined_with_note():
    rng = np.random.default_rng(0)
    inits = {"w": rng.standard_normal((3, 2, 1, 1)).astype(np.float32), **_bn_params(rng, 3)}
    text = f"""{HEADER}
        g (float[1,2,4,4] x) => (float[1,3,4,4] y) {{
            c = Conv(x, w)
            y = BatchNormalization<training_mode = 1>(c, gamma, beta, mean, var)
        }}"""
    _, folded, modified = _fold(text, inits)
    assert not modified
    assert count_ops(folded)["BatchNormalization"] == 1
    assert any("training_mode=1" in n for n in notes(folded))


def test_non_constant_params_noted_once_by_both_passes():
    rng = np.random.default_rng(0)
    params = _bn_params(rng, 3)
    del params["gamma"]
    inits = {"w": rng.standard_normal((3, 2, 1, 1)).astype(np.float32), **params}
    text = f"""{HEADER}
        g (float[1,2,4,4] x, float[3] gamma) => (float[1,3,4,4] y) {{
            c = Conv(x, w)
            {_bn("c", "y")}
        }}"""
    _, folded, modified = _fold(text, inits)
    assert not modified
    assert not DecomposeBatchNormPass()(folded).modified
    assert count_ops(folded)["BatchNormalization"] == 1
    assert len([n for n in notes(folded) if "'gamma' is not a constant" in n]) == 1


def test_inside_if_branch_folded_and_outer_scope_bn_decomposed():
    # then: Conv + BN inside the branch fold; else: a BN reading the outer x has no producer there.
    rng = np.random.default_rng(0)
    inits = {"w": rng.standard_normal((2, 2, 1, 1)).astype(np.float32), **_bn_params(rng, 2)}
    text = f"""{HEADER}
        g (float[1,2,3,3] x, bool k) => (float[1,2,3,3] y) {{
            y = If(k) <
                then_branch = then_g () => (float[1,2,3,3] t) {{
                    c = Conv(x, w)
                    {_bn("c", "t")}
                }},
                else_branch = else_g () => (float[1,2,3,3] e) {{
                    {_bn("x", "e")}
                }}
            >
        }}"""
    original, folded, modified = _fold(text, inits)
    assert modified
    assert count_ops(folded) == {"If": 1, "Conv": 1, "BatchNormalization": 1}
    assert DecomposeBatchNormPass()(folded).modified
    assert count_ops(folded) == {"If": 1, "Conv": 1, "Mul": 1, "Add": 1}
    onnx.checker.check_model(ir.to_proto(folded))
    for k in (True, False):
        assert_numerically_close(original, folded, {**_feeds(x=(1, 2, 3, 3)), "k": np.array(k)})


def test_folded_producer_takes_the_batchnorm_output_name():
    """A tensor name keeps one meaning across float and compiled models (per-layer SQNR matches by name)."""
    rng_local = np.random.default_rng(7)
    text = """<ir_version: 8, opset_import: ["" : 17]>
    g (float[1,3,6,6] x) => (float[1,4,6,6] y) {
      conv_out = Conv <pads=[1,1,1,1]> (x, w)
      bn_out = BatchNormalization (conv_out, s, o, m, v)
      y = Relu(bn_out)
    }"""
    inits = dict(
        w=rng_local.normal(size=(4, 3, 3, 3)).astype(np.float32), s=rng_local.uniform(0.5, 2, 4).astype(np.float32),
        o=rng_local.normal(size=4).astype(np.float32), m=rng_local.normal(size=4).astype(np.float32),
        v=rng_local.uniform(0.5, 2, 4).astype(np.float32),
    )
    model = parse_model(text, inits)
    assert FoldBatchNormPass()(model).modified
    conv = next(n for n in model.graph if n.op_type == "Conv")
    assert conv.outputs[0].name == "bn_out"
    assert "conv_out" not in {o.name for n in model.graph for o in n.outputs}
    assert_numerically_close(parse_model(text, inits), model, {"x": rng_local.normal(size=(1, 3, 6, 6)).astype(np.float32)})
