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


def test_int4_refused_until_the_pass_exists():
    pytest.importorskip("qcompile")  # the pass lands on another branch; until then: one line
    try:
        import qcompile.passes.quantize_int4_weights  # noqa: F401
    except ImportError:
        import qcompile

        with pytest.raises(UsageError, match="not available yet"):
            qcompile.compile_model(
                chain(), "random", CompileOptions(show_progress=False, precision=PrecisionOptions(precision=("mm2=int4",)))
            )
    else:
        pytest.skip("int4 pass present")


def test_keep_float_through_the_pipeline_still_says_why():
    import qcompile

    from tests.precision.models import feeds

    options = CompileOptions(show_progress=False, scheme=SchemeOptions(keep_float=("mm2",)))
    result = qcompile.compile_model(chain(), feeds(), options)
    reasons = {n.name: n.reason for n in result.report.quantization.float_nodes}
    assert reasons["mm2"] == "kept float by --keep-float 'mm2'"
