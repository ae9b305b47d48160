"""InsertObserversPass: the observation model exposes exactly the annotated activations."""

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from qcompile.options import SchemeOptions
from qcompile.passes import AnnotatePass, InsertObserversPass
from qcompile.passes.insert_observers import activation_groups
from tests.helpers import parse_model, run
from tests.passes.test_annotate import CONV_RELU_POOL_GEMM, conv_relu_pool_gemm


def test_observation_model_outputs_annotated_tensors_and_leaves_input_alone():
    model = conv_relu_pool_gemm()
    common_passes.ShapeInferencePass()(model)
    AnnotatePass(SchemeOptions())(model)
    before = ir.to_proto(model).SerializeToString()
    observation = InsertObserversPass()(model).model
    assert observation is not model
    assert ir.to_proto(model).SerializeToString() == before
    groups = activation_groups(model)
    assert set(groups) == {"qcompile_observed__x", "r", "p", "f"}
    names = [o.name for o in observation.graph.outputs]
    assert names[0] == "y" and set(names[1:]) == set(groups)
    x = np.random.default_rng(0).normal(size=(2, 3, 8, 8)).astype(np.float32)
    outputs = dict(zip(names, run(observation, {"x": x})))
    # The observed input is the input itself; the Relu output is non-negative.
    np.testing.assert_array_equal(outputs["qcompile_observed__x"], x)
    assert outputs["r"].min() >= 0
    np.testing.assert_array_equal(outputs["y"], run(conv_relu_pool_gemm_like(model), {"x": x})[0])


def conv_relu_pool_gemm_like(model):
    """The float graph again, with the (unchanged) initializers of ``model``."""
    return parse_model(CONV_RELU_POOL_GEMM, {v.name: v.const_value.numpy() for v in model.graph.initializers.values()})
