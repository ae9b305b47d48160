"""ClearIntermediateShapesPass: no value_info in the output, same numbers, no SkipLayerNormalization fusion."""

import numpy as np
import onnx_ir.passes.common as common_passes

from qcompile.passes import ClearIntermediateShapesPass
from qcompile.verify.fusion import optimized_graph
from tests.helpers import assert_numerically_close, count_ops, parse_model, to_proto

rng = np.random.default_rng(0)

# The Reshape's target is computed (as exporters write it): onnxruntime cannot infer its output
# shape by itself, shape inference with data propagation (ours) can.
RESIDUAL_LAYERNORM = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N,S,16] x) => (float[N,S,16] y) {
  m = MatMul(x, w)
  a = Add(m, bias)
  shape = Shape(x)
  r = Reshape(a, shape)
  s = Add(r, x)
  y = LayerNormalization <axis=-1> (s, gamma, beta)
}"""


def _model():
    return parse_model(
        RESIDUAL_LAYERNORM,
        dict(
            w=rng.normal(size=(16, 16)).astype(np.float32), bias=rng.normal(size=16).astype(np.float32),
            gamma=np.ones(16, np.float32), beta=np.zeros(16, np.float32),
        ),
    )


def test_intermediate_value_info_is_dropped_and_numbers_are_unchanged():
    model = _model()
    common_passes.ShapeInferencePass()(model)
    with_shapes = to_proto(model)
    intermediate = {"m", "a", "r", "s"}
    assert intermediate <= {v.name for v in with_shapes.graph.value_info}
    assert ClearIntermediateShapesPass()(model).modified
    proto = to_proto(model)
    assert not intermediate & {v.name for v in proto.graph.value_info}
    # Inputs, outputs and initializers keep their types.
    assert proto.graph.input[0].type.tensor_type.elem_type == proto.graph.output[0].type.tensor_type.elem_type == 1
    assert_numerically_close(with_shapes, proto, {"x": rng.normal(size=(1, 6, 16)).astype(np.float32)}, rtol=0, atol_rel=0)
    assert not ClearIntermediateShapesPass()(model).modified


def test_without_value_info_onnxruntime_keeps_add_and_layernorm():
    """With the shapes written out, onnxruntime fuses SkipLayerNormalization (measured slower on CPU)."""
    model = _model()
    common_passes.ShapeInferencePass()(model)
    assert count_ops(optimized_graph(to_proto(model)))["SkipLayerNormalization"] == 1
    ClearIntermediateShapesPass()(model)
    ops = count_ops(optimized_graph(to_proto(model)))
    assert ops["SkipLayerNormalization"] == 0 and ops["LayerNormalization"] == 1
