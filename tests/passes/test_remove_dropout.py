import numpy as np
import onnx_ir as ir

from qcompile.graph.notes import notes
from qcompile.passes.remove_dropout import RemoveDropoutPass
from tests.helpers import assert_numerically_close, count_ops, parse_model


def _feeds(**shapes):
    rng = np.random.default_rng(0)
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def _remove(text: str) -> tuple[ir.Model, ir.Model, bool]:
    """(original, rewritten, modified): the pass mutates, so the original is parsed separately."""
    original = parse_model(text)
    rewritten = parse_model(text)
    result = RemoveDropoutPass()(rewritten)
    return original, result.model, result.modified


def test_opset10_ratio_attribute_removed():
    original, rewritten, modified = _remove("""
        <ir_version: 7, opset_import: ["" : 10]>
        g (float[2,3] x) => (float[2,3] y) {
            h = Relu(x)
            d = Dropout<ratio=0.3>(h)
            y = Neg(d)
        }""")
    assert modified
    assert count_ops(rewritten) == {"Relu": 1, "Neg": 1}
    assert_numerically_close(original, rewritten, _feeds(x=(2, 3)))


def test_opset13_ratio_input_removed():
    original, rewritten, modified = _remove("""
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[2,3] x) => (float[2,3] y) {
            r = Constant<value = float {0.5}>()
            d = Dropout(x, r)
            y = Neg(d)
        }""")
    assert modified
    assert count_ops(rewritten)["Dropout"] == 0
    assert_numerically_close(original, rewritten, _feeds(x=(2, 3)))


def test_training_mode_constant_false_removed():
    original, rewritten, modified = _remove("""
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[2,3] x) => (float[2,3] y) {
            r = Constant<value = float {0.5}>()
            t = Constant<value = bool {0}>()
            d = Dropout(x, r, t)
            y = Neg(d)
        }""")
    assert modified
    assert count_ops(rewritten)["Dropout"] == 0
    assert_numerically_close(original, rewritten, _feeds(x=(2, 3)))
    assert notes(rewritten) == []


def test_training_mode_constant_true_kept_with_note():
    _, rewritten, modified = _remove("""
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[2,3] x) => (float[2,3] y) {
            r = Constant<value = float {0.5}>()
            t = Constant<value = bool {1}>()
            d = Dropout(x, r, t)
            y = Neg(d)
        }""")
    assert not modified
    assert count_ops(rewritten)["Dropout"] == 1
    assert any("constant True" in n for n in notes(rewritten))


def test_training_mode_graph_input_kept_with_note():
    _, rewritten, modified = _remove("""
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[2,3] x, bool t) => (float[2,3] y) {
            r = Constant<value = float {0.5}>()
            y = Dropout(x, r, t)
        }""")
    assert not modified
    assert count_ops(rewritten)["Dropout"] == 1
    assert any("computed at run time" in n for n in notes(rewritten))


def test_bool_mask_used_becomes_constant():
    original, rewritten, modified = _remove("""
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[2,3] x) => (float[2,3] y) {
            d, m = Dropout(x)
            mf = Cast<to = 1>(m)
            y = Mul(d, mf)
        }""")
    assert modified
    assert count_ops(rewritten) == {"Constant": 1, "Cast": 1, "Mul": 1}
    assert_numerically_close(original, rewritten, _feeds(x=(2, 3)))


def test_bool_mask_as_graph_output_keeps_name():
    original, rewritten, modified = _remove("""
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[2,3] x) => (float[2,3] y, bool[2,3] m) {
            h = Relu(x)
            y, m = Dropout(h)
        }""")
    assert modified
    assert count_ops(rewritten) == {"Relu": 1, "Constant": 1}
    assert [o.name for o in rewritten.graph.outputs] == ["y", "m"]
    assert_numerically_close(original, rewritten, _feeds(x=(2, 3)))


def test_opset10_mask_used_kept_with_note():
    # Before opset 12 the inference mask is undefined (onnxruntime: all false), so it is not invented.
    _, rewritten, modified = _remove("""
        <ir_version: 7, opset_import: ["" : 10]>
        g (float[2,3] x) => (float[2,3] y, bool[2,3] m) {
            y, m = Dropout(x)
        }""")
    assert not modified
    assert count_ops(rewritten)["Dropout"] == 1
    assert any("opset 10" in n and "mask" in n for n in notes(rewritten))


def test_opset10_unused_mask_output_removed():
    original, rewritten, modified = _remove("""
        <ir_version: 7, opset_import: ["" : 10]>
        g (float[2,3] x) => (float[2,3] y) {
            d, m = Dropout<ratio=0.2>(x)
            y = Neg(d)
        }""")
    assert modified
    assert count_ops(rewritten) == {"Neg": 1}
    assert_numerically_close(original, rewritten, _feeds(x=(2, 3)))


def test_mask_used_with_dynamic_shape_kept_with_note():
    _, rewritten, modified = _remove("""
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[N,3] x) => (float[N,3] y) {
            d, m = Dropout(x)
            mf = Cast<to = 1>(m)
            y = Mul(d, mf)
        }""")
    assert not modified
    assert count_ops(rewritten)["Dropout"] == 1
    assert any("not static" in n for n in notes(rewritten))


def test_output_of_internal_value_keeps_graph_output_name():
    original, rewritten, modified = _remove("""
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[2,3] x) => (float[2,3] y) {
            h = Relu(x)
            y = Dropout(h)
        }""")
    assert modified
    assert count_ops(rewritten) == {"Relu": 1}
    assert [o.name for o in rewritten.graph.outputs] == ["y"]
    assert rewritten.graph.outputs[0].producer().op_type == "Relu"
    assert_numerically_close(original, rewritten, _feeds(x=(2, 3)))


def test_output_of_graph_input_becomes_identity():
    # A graph input cannot be renamed to "y", so an Identity carries the name.
    original, rewritten, modified = _remove("""
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[2,3] x) => (float[2,3] y, float[2,3] z) {
            y = Dropout(x)
            z = Neg(x)
        }""")
    assert modified
    assert count_ops(rewritten) == {"Identity": 1, "Neg": 1}
    assert [o.name for o in rewritten.graph.outputs] == ["y", "z"]
    assert [i.name for i in rewritten.graph.inputs] == ["x"]
    assert_numerically_close(original, rewritten, _feeds(x=(2, 3)))


def test_output_of_another_graph_output_becomes_identity():
    original, rewritten, modified = _remove("""
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[2,3] x) => (float[2,3] h, float[2,3] y) {
            h = Relu(x)
            y = Dropout(h)
        }""")
    assert modified
    assert count_ops(rewritten) == {"Relu": 1, "Identity": 1}
    assert [o.name for o in rewritten.graph.outputs] == ["h", "y"]
    assert_numerically_close(original, rewritten, _feeds(x=(2, 3)))


def test_dropout_inside_if_branches_removed():
    original, rewritten, modified = _remove("""
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[2,3] x, bool c) => (float[2,3] y) {
            y = If(c) <
                then_branch = then_g () => (float[2,3] t) {
                    r = Relu(x)
                    t = Dropout(r)
                },
                else_branch = else_g () => (float[2,3] e) {
                    e = Dropout(x)
                }
            >
        }""")
    assert modified
    assert count_ops(rewritten)["Dropout"] == 0
    for cond in (True, False):
        feeds = {**_feeds(x=(2, 3)), "c": np.array(cond)}
        assert_numerically_close(original, rewritten, feeds)


def test_no_dropout_is_not_modified():
    _, rewritten, modified = _remove("""
        <ir_version: 8, opset_import: ["" : 13]>
        g (float[2,3] x) => (float[2,3] y) {
            y = Relu(x)
        }""")
    assert not modified
    assert count_ops(rewritten) == {"Relu": 1}
