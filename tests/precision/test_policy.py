"""The precision policy: one resolution order, target candidates, one-line refusals."""

import pytest

from qcompile.errors import UsageError
from qcompile.options import CompileOptions, PrecisionOptions, SchemeOptions
from qcompile.precision.policy import Assignment, Precision, PrecisionPolicy, candidates, parse_rule, rules_from_options
from tests.precision.models import chain


def node(model, name):
    return next(n for n in model.graph if n.name == name)


def test_resolution_order_name_pattern_op_type_auto_default():
    model = chain()
    rules = rules_from_options(("MatMul",), ("mm*=int8", "mm2=fp32"))
    auto = {"mm1": Assignment(Precision.FP32, "by the search"), "relu1": Assignment(Precision.FP32, "by the search")}
    policy = PrecisionPolicy(rules, auto)
    # Exact name beats the pattern that beats the op type.
    assert policy.resolve(node(model, "mm2")).precision == Precision.FP32
    assert "mm2=fp32" in policy.resolve(node(model, "mm2")).reason
    assert policy.resolve(node(model, "mm1")).precision == Precision.INT8  # pattern beats op type and auto
    assert "mm*=int8" in policy.resolve(node(model, "mm1")).reason
    # No override: the automatic assignment, then the default.
    assert policy.resolve(node(model, "relu1")) == Assignment(Precision.FP32, "by the search")
    assert policy.resolve(node(model, "relu2")) == Assignment(Precision.INT8, "")
    # Op type beats the automatic assignment.
    only_type = PrecisionPolicy(rules_from_options(("MatMul",), ()), {"mm3": Assignment(Precision.INT8, "x")})
    assert only_type.resolve(node(model, "mm3")).precision == Precision.FP32


def test_float_reasons_feed_annotation_and_keep_float_is_fp32():
    model = chain()
    reasons = PrecisionPolicy(rules_from_options(("mm3",), ("mm1=fp32",))).float_reasons(model.graph)
    assert reasons == {"mm3": "kept float by --keep-float 'mm3'", "mm1": "kept float by --precision 'mm1=fp32'"}


def test_cpu_candidates_and_refusals_in_one_line():
    assert candidates("cpu", "Conv") == (Precision.INT8, Precision.FP32)
    assert Precision.INT4 in candidates("cpu", "MatMul")
    for text, why in (("mm1=int16", "dequantize -> float op -> quantize"), ("*=fp16", "fp16 is for GPU targets")):
        with pytest.raises(UsageError) as info:
            parse_rule(text)
        assert why in str(info.value) and "\n" not in str(info.value)
    for bad in ("mm1", "=fp32", "mm1=int7"):
        with pytest.raises(UsageError):
            PrecisionOptions(precision=(bad,))


def test_int4_only_on_matmul_with_a_constant_weight():
    model = chain()
    with pytest.raises(UsageError, match="cannot take int4"):
        PrecisionPolicy(rules_from_options((), ("relu1=int4",))).resolve_graph(model.graph)
    # A pattern matching other ops too leaves those at the default.
    policy = PrecisionPolicy(rules_from_options((), ("*=int4",)))
    assert policy.int4_nodes(model.graph) == ("mm1", "mm2", "mm3")
    assert set(policy.float_reasons(model.graph)) == {"mm1", "mm2", "mm3"}


def test_int4_through_the_pipeline_fuses_into_matmulnbits():
    """--precision PATTERN=int4: the MatMul stays float in annotation, then gets blockwise int4 weights."""
    import numpy as np

    import qcompile
    from qcompile.options import OutputOptions
    from qcompile.verify.fusion import optimized_graph
    from tests.helpers import count_ops, to_proto
    from tests.passes.test_quantize_int4_weights import _model

    model, _ = _model()
    data = [{"x": np.random.default_rng(i).normal(size=(2, 8, 64)).astype(np.float32)} for i in range(8)]
    options = CompileOptions(show_progress=False, precision=PrecisionOptions(precision=("MatMul=int4",)))
    result = qcompile.compile_model(to_proto(model), data, options)
    assert count_ops(result.model) == {"LayerNormalization": 1, "DequantizeLinear": 1, "MatMul": 1}
    assert result.model.opset_import[0].version == 21
    assert [n.op_type for n in optimized_graph(result.model).graph.node] == ["LayerNormalization", "MatMulNBits"]
    reasons = {n.op_type: n.reason for n in result.report.quantization.float_nodes}
    assert reasons["MatMul"] == "int4 weights by --precision 'MatMul=int4'"
    assert result.report.verification["outputs"][0]["sqnr_db"] > 15.0
    bounded = CompileOptions(show_progress=False, precision=PrecisionOptions(precision=("MatMul=int4",)), output=OutputOptions(max_opset=20))
    with pytest.raises(UsageError, match="opset 21"):
        qcompile.compile_model(to_proto(_model()[0]), data, bounded)


def test_keep_float_through_the_pipeline_still_says_why():
    import qcompile

    from tests.precision.models import feeds

    options = CompileOptions(show_progress=False, scheme=SchemeOptions(keep_float=("mm2",)))
    result = qcompile.compile_model(chain(), feeds(), options)
    reasons = {n.name: n.reason for n in result.report.quantization.float_nodes}
    assert reasons["mm2"] == "kept float by --keep-float 'mm2'"
