"""Sensitivity ranks the layer that int8 hurts most first (numbers from onnxruntime)."""

import onnx_ir as ir

from qcompile.options import CompileOptions, SchemeOptions, SmoothQuantOptions
from qcompile.pipeline import PassRunner, annotate_stage, calibration_stage, cleanup_passes
from qcompile.precision.budget import min_sqnr_db
from qcompile.precision.evaluate import Evaluator, pack, split_samples
from qcompile.precision.policy import PrecisionPolicy
from qcompile.precision.ranges import build_candidate, ranges_by_tensor
from qcompile.precision.sensitivity import keep_float_variant, measure, ranking_subset
from tests.precision.models import chain, feeds


# The static int8 path without SmoothQuant (which would move the chain's outlier into the weights);
# test_rewritten_layers_are_compiled covers the default path.
STATIC = CompileOptions(
    show_progress=False, smooth_quant=SmoothQuantOptions(enabled=False), scheme=SchemeOptions(dynamic_matmul=False)
)


def _setup(model, options=STATIC):
    runner = PassRunner(options)
    model = runner.run(model, cleanup_passes(options))
    cleaned = ir.to_proto(model)
    annotated = annotate_stage(model, runner)
    qparams, _ = calibration_stage(annotated, feeds(), None, runner)
    ranges = ranges_by_tensor(annotated, qparams)
    int8 = build_candidate(cleaned, ranges, PrecisionPolicy(), options)
    return cleaned, ranges, int8, options


def test_outlier_layer_ranks_first_and_keeping_it_float_helps():
    cleaned, ranges, int8, options = _setup(chain(outlier=400.0))
    samples = split_samples(feeds(4, seed=7))
    evaluator = Evaluator(cleaned, pack(cleaned, samples))
    int8_sqnr = min_sqnr_db(evaluator.reference, evaluator.run(int8.proto))
    ranked = measure([("mm1", "MatMul"), ("mm2", "MatMul"), ("mm3", "MatMul")], int8.proto, cleaned, evaluator, int8_sqnr)
    assert ranked[0].name == "mm2"
    assert ranked[0].gain_db > 3.0 and ranked[0].gain_db > ranked[1].gain_db + 3.0
    # The compiled model with mm2 float (not just the edited variant) recovers the error too.
    compiled = build_candidate(cleaned, ranges, PrecisionPolicy(auto={"mm2": _fp32()}), options)
    assert min_sqnr_db(evaluator.reference, evaluator.run(compiled.proto)) > int8_sqnr + 3.0


def test_edited_variant_reads_float_inputs():
    cleaned, _, int8, _ = _setup(chain())
    variant = keep_float_variant(int8.proto, cleaned, "mm2")
    node = next(n for n in variant.graph.node if n.name == "mm2")
    assert list(node.input) == ["ra", "w2"]
    assert any(i.name == "w2" for i in variant.graph.initializer)


def test_ranking_subset_takes_the_worst_samples():
    cleaned, _, int8, _ = _setup(chain())
    samples = split_samples(feeds(2, seed=3))
    single = Evaluator(cleaned, samples)
    outputs = single.run(int8.proto)
    chosen = ranking_subset(samples, single.reference, outputs, 4)
    assert len(chosen) == 4
    rest = [i for i in range(len(samples)) if i not in chosen]
    # The chosen samples are where int8 is furthest from float: lower SQNR than on the rest.
    pick = lambda idx: ([single.reference[i] for i in idx], [outputs[i] for i in idx])  # noqa: E731
    assert min_sqnr_db(*pick(chosen)) < min_sqnr_db(*pick(rest)) - 1.0


def _fp32():
    from qcompile.precision.policy import Assignment, Precision

    return Assignment(Precision.FP32, "test")


def test_rewritten_layers_are_compiled():
    """Run-time quantization turns the MatMuls into MatMulInteger: no edit reaches them, so each
    layer's variant is compiled with it float (the build function), and the gains are still real."""
    options = CompileOptions(show_progress=False, smooth_quant=SmoothQuantOptions(enabled=False))
    cleaned, ranges, int8, options = _setup(chain(outlier=400.0), options)
    # mm1 reads the graph input (a float tensor): quantized at run time, so no edit reaches it.
    assert keep_float_variant(int8.proto, cleaned, "mm1") is None
    samples = split_samples(feeds(4, seed=7))
    evaluator = Evaluator(cleaned, pack(cleaned, samples))
    int8_sqnr = min_sqnr_db(evaluator.reference, evaluator.run(int8.proto))
    built = []

    def build(float_layers):
        built.append(float_layers)
        return build_candidate(cleaned, ranges, PrecisionPolicy(auto={n: _fp32() for n in float_layers}), options).proto

    ranked = measure([("mm1", "MatMul"), ("mm2", "MatMul"), ("mm3", "MatMul")], int8.proto, cleaned, evaluator, int8_sqnr, build)
    assert frozenset({"mm1"}) in built
    assert ranked[0].name == "mm2" and ranked[0].gain_db > 3.0


def test_no_edit_when_the_float_input_is_gone_or_integer():
    # A pass that moved the quantization before the data movement (sibling fusion) leaves no float
    # tensor for the layer to read: the edit must give None (the layer is compiled), not a model
    # that reads a missing or uint8 tensor as float.
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "w")
    cleaned = helper.make_model(helper.make_graph(
        [helper.make_node("Transpose", ["x"], ["t"], name="tr"), helper.make_node("MatMul", ["t", "w"], ["y"], name="mm")],
        "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [4, 4])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [4, 4])], [w]))

    def int8_model(transposed_name):
        s = numpy_helper.from_array(np.array(0.1, np.float32), "s")
        z = numpy_helper.from_array(np.array(128, np.uint8), "z")
        nodes = [
            helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]),
            helper.make_node("Transpose", ["xq"], [transposed_name]),
            helper.make_node("DequantizeLinear", [transposed_name, "s", "z"], ["td"]),
            helper.make_node("MatMul", ["td", "w"], ["y"], name="mm"),
        ]
        return helper.make_model(helper.make_graph(nodes, "g", list(cleaned.graph.input), list(cleaned.graph.output), [w, s, z]))

    assert keep_float_variant(int8_model("t_quantized"), cleaned, "mm") is None  # "t" is gone
    # "t" exists but holds uint8 (a Transpose of a QuantizeLinear's output): not a float tensor.
    assert keep_float_variant(int8_model("t"), cleaned, "mm") is None
