import numpy as np
import onnx_ir.passes.common as common_passes
import pytest

from qcompile.passes.reduce_mean_to_pool import ReduceMeanToGlobalPoolPass
from tests.helpers import assert_numerically_close, count_ops, parse_model

rng = np.random.default_rng(0)
X = {"x": rng.normal(size=(2, 3, 5, 4)).astype(np.float32)}


def _model(opset: int, axes: list[int], keepdims: int = 1):
    if opset >= 18:
        body = f"a = Constant <value = int64[{len(axes)}] {{{', '.join(map(str, axes))}}}> ()\n y = ReduceMean <keepdims={keepdims}> (x, a)"
    else:
        body = f"y = ReduceMean <axes=[{', '.join(map(str, axes))}], keepdims={keepdims}> (x)"
    out_shape = "[2,3,1,1]" if keepdims else "[2,3]"
    text = f"""<ir_version: 8, opset_import: ["" : {opset}]>
    g (float[2,3,5,4] x) => (float{out_shape} y) {{ {body} }}"""
    model = parse_model(text)
    common_passes.ShapeInferencePass()(model)
    return text, model


@pytest.mark.parametrize("opset, axes", [(18, [2, 3]), (18, [-1, -2]), (13, [2, 3]), (17, [-2, -1])])
def test_spatial_mean_becomes_global_average_pool(opset, axes):
    text, model = _model(opset, axes)
    assert ReduceMeanToGlobalPoolPass()(model).modified
    common_passes.RemoveUnusedNodesPass()(model)
    assert count_ops(model) == {"GlobalAveragePool": 1}
    assert [o.name for o in model.graph.outputs] == ["y"]
    assert_numerically_close(parse_model(text), model, X)


@pytest.mark.parametrize("opset, axes, keepdims", [(18, [1, 2, 3], 1), (18, [2, 3], 0), (13, [3], 1)])
def test_other_reductions_are_left_alone(opset, axes, keepdims):
    _, model = _model(opset, axes, keepdims)
    assert not ReduceMeanToGlobalPoolPass()(model).modified
    assert count_ops(model)["ReduceMean"] == 1
