"""Failures the fuzzers found, each reduced to a minimal reproduction that now passes (1c, 1f: still open).

From the graph fuzzer (test_fuzz_graphs.py):
1. A Dropout between two graph outputs (``b = BN(c)``, ``d = Dropout(b)``, both outputs): onnx-ir's
   identity elimination merged the two outputs into one name, the model lost output ``b``.
1a. A GlobalAveragePool whose output was 0 on every calibration sample (a zero mean) got the scale
   floor 1e-8; onnxruntime's QLinearGlobalAveragePool refuses x_scale / (y_scale · pixels) ≥ 256, so
   the compiled model did not run. A zero range now gets scale 1 (as onnxruntime's quantizer does);
   a tiny but nonzero output range is widened to the kernel's bound (AssignQParamsPass).
1b. Not a compiler fault but the fuzz bound's: an output that is a small difference of large terms
   (a Gemm summing terms of both signs to about 0) has 5 dB SQNR under int8, qcompile's and
   onnxruntime's quantizer alike; such outputs now get onnxruntime's quantizer as a second opinion.
1c. Open (xfail): a rank-1 Gemm chain whose output cancels, 1.3 dB against onnxruntime's 7.3 dB.
1d. Not a compiler fault but the generator's: a LayerNormalization over 2 features is
   sign(x₀ − x₁)·γ + β; a row whose two inputs lie within a few int8 steps flips sign. One of 24
   rows flipped: 8.1 dB (every other row within 0.002), onnxruntime's quantizer 11.6 dB; with
   smoothing on and dynamic MatMuls off the same graph gave 47.6 dB (no flip). LayerNorm is now
   generated over 4 features or more.
1e. Not a compiler fault but the generator's: LayerNorm outlier channels (γ × 30) into Q and K
   made attention scores of ±800 (±560 after the 1/√d Mul): softmax is then an argmax, and an int8
   step of the scores (~5) exceeds the gap between the top two logits of some rows, so the chosen
   token flips. The output SQNR was luck: 8.3 dB by default, 24.2 without SmoothQuant, 23.6 with
   min/max calibration, 20.3 without dynamic MatMuls, onnxruntime's quantizer 18.6 dB. The
   generator now divides the query/key weights by the outlier gain it put into their input.
1f. Open (no reduced test yet; the long run's first failure, ``-m slow tests/fuzz``): per-tensor
   weights, a second attention block's output projection (d = 4, one head) at 9.8 dB against
   onnxruntime's quantizer's 14.0 dB. Not the new MatMul passes: without sibling fusion 9.8 dB,
   without dynamic MatMuls 9.9, with activation MatMuls float 9.1, without SmoothQuant 8.1, with
   min/max calibration 10.1; per-channel weights give 30.5 dB. The error builds up along the chain
   of 12 MatMuls (two attention blocks, sibling groups): every MatMul float 42.8 dB, the first half
   float 19.7, any one group float 9.3-13.5; no single rewrite stands out.

From the byte corruption fuzzer (test_corruption.py):
2. A name that is not UTF-8, quoted by onnx's checker: a UnicodeDecodeError escaped load_model.
3. A node name that is not UTF-8 but that the checker accepts: the model loaded, then onnx-ir's
   serializer failed inside compile (an internal error).
4. A NaN in a weight (a flipped exponent bit): qparams_from_range raised a bare ValueError.
5. An initializer that is also a graph output: PlaceQDQPass raised onnx-ir's ValueError.
6. An input whose element type is UNDEFINED (a flipped bit; onnx's checker accepts it):
   input_specs raised a TypeError.
7. A tensor whose dims no longer match its data: onnx-ir raised a reshape ValueError in a pass.

From the external-data tests (tests/graph/test_external_data.py, which hold their regressions):
8. A location with a NUL byte, 9. a symlink loop (ValueError / RuntimeError from Path.resolve), and
10. a symlink inside the folder (onnx's ValidationError) escaped load_model.
"""

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from click.testing import CliRunner

import qcompile
from qcompile.cli import main
from qcompile.errors import InvalidModelError
from qcompile.graph.io import load_model
from qcompile.options import SchemeOptions
from qcompile.passes import EliminateIdentityPass
from tests.fuzz.graphs import FuzzModel
from tests.fuzz.test_fuzz_graphs import check_compiles_and_stays_close
from tests.helpers import parse_model, run, sqnr_db, to_proto

rng = np.random.default_rng(0)


def _feeds(shape, n=6):
    return [{"x": rng.normal(size=shape).astype(np.float32)} for _ in range(n)]


def _quiet():
    return qcompile.CompileOptions(show_progress=False)


# ---- 1. Identity between two graph outputs -------------------------------------------------------

TWO_OUTPUTS_AROUND_DROPOUT = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N,2,3,3] x) => (float[N,2,3,3] c, float[N,2,3,3] b, float[N,2,3,3] d) {
  c = Conv (x, w)
  b = BatchNormalization (c, s, o, m, v)
  d = Dropout (b)
}"""


def test_dropout_between_two_graph_outputs_keeps_both_outputs():
    model = parse_model(TWO_OUTPUTS_AROUND_DROPOUT, dict(
        w=rng.normal(size=(2, 2, 1, 1)).astype(np.float32), s=np.ones(2, np.float32), o=np.zeros(2, np.float32),
        m=np.zeros(2, np.float32), v=np.ones(2, np.float32),
    ))
    feeds = _feeds((2, 2, 3, 3))
    result = qcompile.compile_model(to_proto(model), feeds, _quiet(), verify_data=feeds)
    assert [o.name for o in result.model.graph.output] == ["c", "b", "d"]
    for ref, got in zip(run(model, feeds[0]), run(result.model, feeds[0])):
        assert sqnr_db(ref, got) > 25


def test_identity_elimination_keeps_an_identity_between_two_outputs_and_removes_others():
    model = parse_model("""<ir_version: 8, opset_import: ["" : 17]>
    g (float[N,2] x) => (float[N,2] b, float[N,2] d) {
      a = Relu (x)
      a2 = Identity (a)
      b = Sigmoid (a2)
      d = Identity (b)
    }""")
    assert EliminateIdentityPass()(model).modified  # a2 goes: this also checks onnx-ir's hook is called
    assert [n.op_type for n in model.graph] == ["Relu", "Sigmoid", "Identity"]
    assert [o.name for o in model.graph.outputs] == ["b", "d"]


# ---- 1a. a global average pool whose output range is (nearly) empty ---------------------------------

GLOBAL_POOL = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N,2,4,4] x) => (float[N,2,1,1] p) { p = GlobalAveragePool (x) }"""


def _zero_mean_feeds(offset: float):
    """Integer data whose every channel sums to exactly 0, then one value moved by ±offset."""
    feeds = []
    for _ in range(4):
        x = rng.integers(-8, 9, size=(2, 2, 4, 4)).astype(np.float32)
        x[..., 0, 0] -= x.sum(axis=(2, 3))
        x[..., 1, 1] += offset * rng.choice([-1, 1], size=(2, 2))
        feeds.append({"x": x})
    return feeds


def test_global_pool_with_a_zero_output_range_runs_and_is_reported():
    feeds = _zero_mean_feeds(0.0)
    result = qcompile.compile_model(onnx.parser.parse_model(GLOBAL_POOL), feeds, _quiet(), verify_data=feeds)
    assert any("zero range" in w and "'p'" in w for w in result.report.warnings)
    np.testing.assert_array_equal(run(result.model, feeds[0])[0], 0.0)


def test_global_pool_with_a_tiny_output_range_runs():
    """Found by fuzzing: onnxruntime refused QLinearGlobalAveragePool with x_scale / (y_scale·pixels) ≥ 256."""
    feeds = _zero_mean_feeds(1e-3)
    result = qcompile.compile_model(onnx.parser.parse_model(GLOBAL_POOL), feeds, _quiet(), verify_data=feeds)
    notes = [n for p in result.report.passes for n in p.notes]
    assert any("int8 pooling bound" in n for n in notes)
    assert result.report.fusion["int8_kernels"].get("QLinearGlobalAveragePool", 0) == 1


# ---- 1b. an output near 0 made of large terms ----------------------------------------------------

CANCELLATION = """<ir_version: 8, opset_import: ["" : 17]>
fuzz (float[N,2,3,3] x) => (float[N,2] flatten28, float[N,10] matmul31, float[N,1] gemm34)
   <float[2,1,1] c1 = {-1.1130067,1.380859}, float[2] bn4 = {1.25434,1.1689533},
    float[2] bn5 = {-0.028408237,0.10871163}, float[2] bn6 = {-0.44853064,0.019882068},
    float[2] bn7 = {1.3748137,1.0065933}, float[2,2,1,1] w12 = {-0.6944905,0.38825855,-1.0995301,-0.12951128},
    float c15 = {0}, float c16 = {6}, float[2,2,1,1] w19 = {1.0483123,1.7719861,-1.0573131,-0.9826373},
    float[2,10] mw30 = {-1.0100225,0.7591707,-0.4991832,0.5911631,-0.7672886,-0.5157307,-0.7694549,0.3941563,
      -0.040403888,0.347474,0.028458355,-0.15490018,0.023288904,1.0421692,1.029844,0.2632165,-0.3842731,
      0.1448783,-0.828182,0.24973047},
    float[10,1] fw33 = {0.2855297,-0.08743685,0.051168866,0.45377463,-0.29492784,-0.2231967,0.48833236,
      0.35852936,0.019743187,0.0039035233}>
{
   add2 = Add (x, c1)
   batchnormalization8 = BatchNormalization <epsilon: float = 1e-05> (add2, bn4, bn5, bn6, bn7)
   globalaveragepool10 = GlobalAveragePool (batchnormalization8)
   conv13 = Conv <kernel_shape: ints = [1, 1]> (globalaveragepool10, w12)
   clip17 = Clip (conv13, c15, c16)
   conv20 = Conv <kernel_shape: ints = [1, 1]> (globalaveragepool10, w19)
   relu22 = Relu (conv20)
   add24 = Add (clip17, relu22)
   globalaveragepool26 = GlobalAveragePool (add24)
   flatten28 = Flatten <axis: int = 1> (globalaveragepool26)
   matmul31 = MatMul (flatten28, mw30)
   gemm34 = Gemm (matmul31, fw33)
}"""


def test_output_that_cancels_to_near_zero_is_judged_against_onnxruntimes_quantizer():
    proto = onnx.parser.parse_model(CANCELLATION)
    onnx.checker.check_model(proto, full_check=True)
    check_compiles_and_stays_close(FuzzModel(proto, (2, 3, 3)), SchemeOptions())


# ---- 1c. a rank-1 Gemm chain whose output cancels (open: expected to fail) ---------------------
# Found by the long graph fuzz run on 2026-12-07. gemm47 = gemm44 · fw46 with gemm44 = gemm41 · fw43
# (rank 1): the three channels of gemm44 cancel to 0.22× their size, so their rounding errors do not.
# qcompile gets 1.3 dB (3.4 dB with SmoothQuant off, as before this session's changes), onnxruntime's
# quantizer 7.3 dB; the property allows 3 dB less than onnxruntime's. SmoothQuant lowers gemm41's own
# simulated error 3x (its objective is the layer's output, not the model's). Not fixed yet.

RANK_ONE_CANCELLATION = """<ir_version: 8, opset_import: ["" : 17]>
fuzz (float[N,2,5,7] x) => (float[N,35] flatten7, float[N,3] mul17, float[N,3] concat23, float[N,3] gemm26, float[N,3] dropout28, float[N,4] mul38, float[N,1] gemm41, float[N,3] gemm44, float[N,1] gemm47) 
   <int64[1] sl1 =  {0}, int64[1] sl2 =  {1}, int64[1] sl3 =  {1}, int64[1] sl4 =  {1}, float[3,35] fw9 =  {-0.31403485,-0.1080846,0.04206904,0.00786089,0.30368268,0.046093233,-0.03750577,-0.2027443,0.3226939,-0.06477968,0.29789782,-0.25794035,0.037142385,-0.11142454,0.27241474,-0.07537565,-0.098987214,-0.14843774,0.06386718,0.22366485,0.08780056,0.08440125,0.15999237,-0.10047069,-0.12256066,0.28780463,0.08375734,0.165939,-0.04458474,-0.08777038,-0.036454402,-0.22317305,0.064448416,0.23577882,0.33890778,-0.1017062,0.02744891,-0.20522286,-0.01823901,-0.09951638,0.17559795,0.35515243,-0.13424642,0.09816834,0.20973267,0.21074377,-0.0658779,0.059656806,0.18130851,0.01428999,0.26387304,-0.11772442,0.058013674,0.27391186,0.118663125,0.25522253,0.051835988,-0.10085891,-0.05000239,-0.14654407,-0.25959253,0.09547743,-0.12489641,0.00092296087,-0.12658995,-0.035011243,0.075787574,0.029223336,0.092043795,-0.11004214,-0.13583386,-0.21581864,-0.2453722,-0.15337393,-0.006619108,0.025952997,-0.10440832,0.03389835,0.19108422,0.20158425,0.046866592,-0.33306706,-0.19984034,0.26816633,0.23978494,0.33284253,-0.098434806,-0.04662627,0.17636143,-0.561459,0.029194847,0.104790695,-0.059525963,-0.04703776,-0.04404017,-0.0071422555,0.014096858,-0.32882613,-0.29151446,-0.02065724,-0.31112185,-0.076880746,-0.16103505,0.023026984,-0.16942415}, float[3] fb10 =  {0,0,0}, float[3,35] fw13 =  {-0.09590499,-0.024690207,-0.18782973,0.1033198,0.11728931,-0.22244652,0.13566983,0.090405196,-0.08656335,0.08467499,0.09482817,0.02943873,0.2949764,-0.2069476,0.1355613,0.19303206,0.16135588,0.21605648,0.31745625,-0.21455231,-0.19599785,-0.010644375,0.043081775,-0.06860247,-0.013615935,0.14300679,-0.11592013,0.01943174,-0.21465296,-0.23406427,0.35218123,-0.055636376,-0.2307558,-0.039258942,-0.066269316,-0.00205004,0.14670059,0.03637392,0.011927185,-0.034630466,0.118135996,-0.08171473,-0.2681385,-0.09794583,-0.07395967,-0.17448625,-0.13530305,0.06322653,-0.17861742,-0.09737593,-0.060496964,-0.12765157,0.14174898,-0.06006359,-0.064387724,0.0033014258,-0.02852665,-0.027592981,0.042057898,-0.016241098,-0.18731856,-0.28431174,-0.260804,0.04383294,0.22424462,0.14644116,-0.12016722,0.180589,-0.0056183026,-0.067657955,0.5665876,-0.39159063,-0.0012890314,-0.1106025,-0.04681819,-0.016949592,0.20071988,-0.019465137,-0.22420987,-0.09678547,0.13433583,-0.30587807,0.2568541,-0.20146301,-0.053282656,-0.20788996,-0.17641927,-0.11764736,-0.12897938,0.009393154,-0.05181788,-0.11020047,-0.012794941,0.16681021,-0.28008074,0.040448006,0.30699944,-0.108258545,0.09009491,0.02886822,0.1948823,0.05267672,-0.17485204,0.17663006,-0.045643795}, float[3] fb14 =  {0,0,0}, int64[2] sizes21 =  {1,2}, float[3,3] fw25 =  {0.080576934,-0.3399097,-0.047897648,-0.5394773,-0.5003206,0.40940994,0.40732643,1.3005103,0.280854}, float[4,3] fw30 =  {-0.71241814,0.024141852,-0.10915154,0.7248389,0.5823136,-0.0139498515,-0.27970496,-0.122520655,0.77599365,-0.52235436,-0.32277036,0.26592976}, float[4] fb31 =  {0,0,0,0}, float[4,3] fw34 =  {-0.14861491,0.7550965,-0.025514098,0.7825497,-0.10737048,-0.24821165,-0.14295639,0.55234605,0.41719192,0.7119184,0.21036844,0.051988248}, float[4] fb35 =  {0,0,0,0}, float[4,1] fw40 =  {-0.01704019,0.1634849,0.10115761,-0.29043272}, float[1,3] fw43 =  {-0.27219427,-1.0827925,0.95852095}, float[3,1] fw46 =  {0.36995488,-0.58774686,-0.78489906}, float[N,1,5,7] slice5, float[N,3] gemm11, float[N,3] gemm15, float[N,1] split19, float[N,2] split20, float[N,4] gemm32, float[N,4] gemm36>
{
   [n_Slice_6] slice5 = Slice (x, sl1, sl2, sl3, sl4)
   [n_Flatten_8] flatten7 = Flatten <axis: int = 1> (slice5)
   [n_Gemm_12] gemm11 = Gemm <transB: int = 1> (flatten7, fw9, fb10)
   [n_Gemm_16] gemm15 = Gemm <transB: int = 1> (flatten7, fw13, fb14)
   [n_Mul_18] mul17 = Mul (gemm11, gemm15)
   [n_Split_22] split19, split20 = Split <axis: int = 1> (mul17, sizes21)
   [n_Concat_24] concat23 = Concat <axis: int = 1> (split20, split19)
   [n_Gemm_27] gemm26 = Gemm <alpha: float = 1, beta: float = 1, transB: int = 0> (concat23, fw25)
   [n_Dropout_29] dropout28 = Dropout (gemm26)
   [n_Gemm_33] gemm32 = Gemm <transB: int = 1> (dropout28, fw30, fb31)
   [n_Gemm_37] gemm36 = Gemm <transB: int = 1> (dropout28, fw34, fb35)
   [n_Mul_39] mul38 = Mul (gemm32, gemm36)
   [n_Gemm_42] gemm41 = Gemm <alpha: float = 1, beta: float = 1, transB: int = 0> (mul38, fw40)
   [n_Gemm_45] gemm44 = Gemm <alpha: float = 1, beta: float = 1, transB: int = 0> (gemm41, fw43)
   [n_Gemm_48] gemm47 = Gemm <alpha: float = 1, beta: float = 1, transB: int = 0> (gemm44, fw46)
}"""


@pytest.mark.xfail(strict=True, reason="open fuzz finding 1c: a cancelling rank-1 Gemm chain, 1.3 dB vs onnxruntime's 7.3 dB")
def test_cancelling_rank_one_gemm_chain_stays_within_onnxruntimes_quantizer():
    proto = onnx.parser.parse_model(RANK_ONE_CANCELLATION)
    onnx.checker.check_model(proto, full_check=True)
    check_compiles_and_stays_close(FuzzModel(proto, (2, 5, 7)), SchemeOptions())


# ---- 2, 3. strings that are not UTF-8 ------------------------------------------------------------

NAMES = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N,4] x) => (float[N,4] y) { [nodenamezq] y = Add (x, zqzq) }"""


@pytest.mark.parametrize("old, new, field", [
    (b"zqzq", b"z\xe5qz", "graph.node.input"),  # undefined input: the checker quotes it
    (b"nodenamezq", b"nodename\xe5q", "graph.node.name"),  # the checker accepts it
])
def test_strings_that_are_not_utf8_are_an_invalid_model(tmp_path, old, new, field):
    data = onnx.parser.parse_model(NAMES).SerializeToString()
    assert data.count(old) == 1
    path = tmp_path / "m.onnx"
    path.write_bytes(data.replace(old, new))
    with pytest.raises(InvalidModelError, match=f"a string in {field} is not UTF-8"):
        load_model(path)
    with pytest.raises(InvalidModelError, match="not UTF-8"):
        load_model(onnx.load_from_string(path.read_bytes()))
    result = CliRunner().invoke(main, ["compile", str(path), "-o", str(tmp_path / "o.onnx"), "--calib", "random"])
    assert result.exit_code == 3 and result.stderr.count("\n") == 1, result.output


# ---- 4. NaN / Inf constants ----------------------------------------------------------------------

GEMM_AND_MASK = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N,4] x) => (float[N,3] y, float[N,4] masked) {
  y = Gemm <transB=1> (x, w, b)
  masked = Add (x, mask)
}"""


def test_non_finite_constants_leave_their_op_float_with_a_reason():
    w = rng.normal(size=(3, 4)).astype(np.float32)
    w[1, 2] = np.nan
    mask = np.zeros(4, np.float32)
    mask[0] = -np.inf
    proto = to_proto(parse_model(GEMM_AND_MASK, dict(w=w, b=np.zeros(3, np.float32), mask=mask)))
    result = qcompile.compile_model(proto, _feeds((2, 4)), _quiet())
    reasons = {f.op_type: f.reason for f in result.report.quantization.float_nodes}
    assert "'w' holds NaN or Inf" in reasons["Gemm"] and "'mask' holds NaN or Inf" in reasons["Add"]
    # The float model's NaN output is reported by verification, not hidden.
    assert not result.verification_passed


# ---- 5. an initializer that is also a graph output -----------------------------------------------

BIAS_AS_OUTPUT = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N,3,8,8] x) => (float[N,4,8,8] y, float[4] b) {
  y = Conv <pads=[1,1,1,1]> (x, w, b)
}"""


def test_initializer_that_is_a_graph_output_stays_float_there():
    b = rng.normal(size=4).astype(np.float32)
    model = parse_model(BIAS_AS_OUTPUT, dict(w=rng.normal(size=(4, 3, 3, 3)).astype(np.float32), b=b))
    feeds = _feeds((2, 3, 8, 8))
    result = qcompile.compile_model(to_proto(model), feeds, _quiet())
    assert [o.name for o in result.model.graph.output] == ["y", "b"]
    y, b_out = run(result.model, feeds[0])
    np.testing.assert_array_equal(b_out, b)
    assert sqnr_db(run(model, feeds[0])[0], y) > 25
    assert any(n.op_type == "DequantizeLinear" and n.input[0] == "b_quantized" for n in result.model.graph.node)
    assert ir.from_proto(result.model)  # a valid, loadable model


# ---- 6. an input of UNDEFINED type -------------------------------------------------------------


def test_input_of_undefined_type_is_an_invalid_model(tmp_path):
    proto = onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 17]>
    g (float[N,4] x) => (float[N,4] y) { y = Relu (x) }""")
    proto.graph.input[0].type.tensor_type.elem_type = onnx.TensorProto.UNDEFINED
    onnx.checker.check_model(proto)  # onnx lets it through
    with pytest.raises(InvalidModelError, match="'x' has element type UNDEFINED"):
        qcompile.compile_model(proto, "random", _quiet())


# ---- 7. data that does not fit its shape ---------------------------------------------------------


@pytest.mark.parametrize("raw", [True, False])
@pytest.mark.parametrize("rows, words", [(2, "holds (48 bytes|12 values) of data, its shape needs (32|8)"), (4, "too small")])
def test_tensor_whose_data_does_not_fit_its_shape_is_an_invalid_model(tmp_path, raw, rows, words):
    proto = onnx.parser.parse_model("""<ir_version: 8, opset_import: ["" : 17]>
    g (float[N,4] x) => (float[N,3] y) { y = Gemm <transB=1> (x, w) }""")
    w = onnx.helper.make_tensor("w", onnx.TensorProto.FLOAT, [3, 4], np.ones(12, np.float32), raw=raw)
    w.dims[0] = rows  # as a damaged varint would; onnx's checker catches only data that is too small
    proto.graph.initializer.append(w)
    path = tmp_path / "m.onnx"
    path.write_bytes(proto.SerializeToString())
    with pytest.raises(InvalidModelError, match=words):
        load_model(path)
