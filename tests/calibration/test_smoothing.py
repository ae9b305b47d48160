"""SmoothQuant's α search (calibration/smoothing) apart from the graph rewrite (passes/smooth_quant):
its decisions, given back to the pass, rewrite the graph alike without statistics."""

import ast
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

import qcompile.calibration
from qcompile.calibration.channel_stats import collect_channel_stats
from qcompile.calibration.smoothing import SmoothDecision
from qcompile.options import CalibrationOptions, SchemeOptions, SmoothQuantOptions
from qcompile.passes import AnnotatePass, SmoothQuantPass
from tests.helpers import parse_model
from tests.passes.test_smooth_quant import LN_GROUP, _feeds, _inits


def annotated():
    model = parse_model(LN_GROUP, _inits())
    common_passes.ShapeInferencePass()(model)
    AnnotatePass(SchemeOptions())(model)
    return model


def smooth(model, statistics, decisions=None):
    pass_ = SmoothQuantPass(SmoothQuantOptions(), SchemeOptions(), CalibrationOptions(), statistics, decisions)
    return pass_, pass_(model)


def test_given_decisions_rewrite_the_graph_as_the_search_did_without_statistics():
    searched = annotated()

    def statistics(names):
        return collect_channel_stats(searched, names, _feeds(), rows=SmoothQuantOptions().rows)

    first, result = smooth(searched, statistics)
    assert result.modified and first.computed == ["h"] and first.decisions["h"].factors.shape == (16,)

    def no_statistics(names):
        raise AssertionError("statistics were read although every group had a decision")

    replayed = annotated()
    second, again = smooth(replayed, no_statistics, first.decisions)
    assert again.modified and second.computed == []
    assert ir.to_proto(replayed).SerializeToString() == ir.to_proto(searched).SerializeToString()


def test_a_decision_that_does_not_fit_the_tensor_is_recomputed():
    model = annotated()
    asked = []

    def statistics(names):
        asked.append(names)
        return collect_channel_stats(model, names, _feeds(), rows=64)

    reference, _ = smooth(annotated(), statistics)
    wrong = {"h": SmoothDecision(0.5, CalibrationOptions().method, 1.0, 0.5, np.ones(3))}  # 3 factors for 16 channels
    pass_, _ = smooth(model, statistics, wrong)
    assert pass_.computed == ["h"] and asked[-1] == ["h"] and pass_.decisions["h"].factors.shape == (16,)


def test_calibration_imports_no_pass():
    # The layering rule (calibration sits below the passes); observation models live in graph/.
    for path in Path(qcompile.calibration.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                assert not node.module.startswith("qcompile.passes"), f"{path.name} imports {node.module}"
