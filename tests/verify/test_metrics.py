import json
import math

import numpy as np
import pytest

from qcompile.errors import InvalidModelError
from qcompile.verify.metrics import OutputComparison, compare_arrays


def test_sqnr_and_errors_of_a_known_noise():
    # signal 6² + 8² = 100, noise 1² = 1 → 10·log10(100) = 20 dB
    m = compare_arrays(np.array([[6.0, 8.0]]), np.array([[6.0, 7.0]]))
    assert m.sqnr_db == pytest.approx(20.0)
    assert m.max_abs_error == 1.0
    assert m.mean_abs_error == 0.5
    assert m.samples == 1 and m.elements == 2
    assert m.nonfinite == 0 and m.note is None


def test_sqnr_of_one_tenth_noise_in_every_element():
    ref = np.full((5, 2), 2.0)
    # noise 0.2 per element: 10·log10(4 / 0.04) = 20 dB, whatever the element count
    m = compare_arrays(ref, ref + 0.2)
    assert m.sqnr_db == pytest.approx(20.0)


def test_cosine_identical_orthogonal_opposite():
    a = np.array([[1.0, 0.0]], dtype=np.float32)
    b = np.array([[0.0, 1.0]], dtype=np.float32)
    assert compare_arrays(a, a).cosine == pytest.approx(1.0)
    assert compare_arrays(a, b).cosine == pytest.approx(0.0)
    assert compare_arrays(a, -a).cosine == pytest.approx(-1.0)


def test_global_and_per_sample_cosine_differ():
    ref = np.array([[1.0, 0.0], [1.0, 1.0]])
    test = np.array([[0.0, 1.0], [1.0, 1.0]])
    m = compare_arrays(ref, test)
    assert m.mean_sample_cosine == pytest.approx(0.5)  # (0 + 1) / 2
    assert m.cosine == pytest.approx(2.0 / 3.0)  # 2 / (√3·√3)


def test_zero_norm_cosines():
    zeros = np.zeros((2, 3))
    assert compare_arrays(zeros, zeros).cosine == 1.0
    assert compare_arrays(zeros, np.ones((2, 3))).cosine == 0.0


def test_identical_outputs_have_infinite_sqnr_and_json_null():
    ref = np.arange(6, dtype=np.float32).reshape(2, 3)
    m = compare_arrays(ref, ref.copy(), name="logits")
    assert m.sqnr_db == math.inf
    assert m.max_abs_error == 0.0
    j = m.to_json()
    assert j["sqnr_db"] is None and "identical" in j["note"]
    assert j["name"] == "logits"
    json.dumps(j, allow_nan=False)


def test_zero_reference_with_noise_is_minus_infinity():
    assert compare_arrays(np.zeros(3), np.ones(3)).sqnr_db == -math.inf


def test_top1_agreement():
    ref = np.eye(3)[[0, 1, 2, 0]]
    test = np.eye(3)[[0, 0, 2, 1]]
    assert compare_arrays(ref, test).top1_agreement == 0.5


def test_top1_only_for_classifier_like_outputs():
    assert compare_arrays(np.ones((4, 1)), np.ones((4, 1))).top1_agreement is None  # one class
    assert compare_arrays(np.ones(4), np.ones(4)).top1_agreement is None  # rank 1
    assert compare_arrays(np.ones((2, 3, 4)), np.ones((2, 3, 4))).top1_agreement is None  # rank 3
    rank1 = compare_arrays(np.arange(4.0), np.arange(4.0))
    assert rank1.mean_sample_cosine is None and rank1.samples == 4


def test_streaming_over_batches_equals_one_batch():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((12, 10)).astype(np.float32)
    test = ref + 0.1 * rng.standard_normal((12, 10)).astype(np.float32)
    streamed = OutputComparison("y")
    for part in np.split(np.arange(12), [3, 7]):
        streamed.update(ref[part], test[part])
    s, whole = streamed.result(), compare_arrays(ref, test, name="y")
    assert s.samples == whole.samples == 12
    fields = ("sqnr_db", "cosine", "mean_sample_cosine", "max_abs_error", "mean_abs_error", "top1_agreement")
    for field in fields:
        assert getattr(s, field) == pytest.approx(getattr(whole, field), rel=1e-12), field
    # and both agree with a direct float64 computation
    noise = np.sum((ref.astype(np.float64) - test) ** 2)
    assert s.sqnr_db == pytest.approx(10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / noise), rel=1e-9)
    assert 0.0 < s.top1_agreement <= 1.0


def test_nan_in_test_output_is_a_failure_not_a_crash():
    ref = np.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]], dtype=np.float32)
    test = ref.copy()
    test[1, 0] = np.nan
    m = compare_arrays(ref, test)
    assert m.sqnr_db == -math.inf
    assert m.nonfinite == 1 and m.elements == 5
    assert "NaN" in m.note
    # the other metrics cover the finite pairs only, which are identical
    assert m.max_abs_error == 0.0 and m.cosine == pytest.approx(1.0)
    # the row with the NaN does not count as agreeing, although its argmax happens to match
    assert m.top1_agreement == 0.5
    assert json.loads(json.dumps(m.to_json(), allow_nan=False))["sqnr_db"] is None


def test_shape_mismatch_and_empty_comparison_raise():
    with pytest.raises(InvalidModelError, match="shape"):
        compare_arrays(np.ones((2, 3)), np.ones((2, 4)))
    with pytest.raises(InvalidModelError, match="no values"):
        OutputComparison("y").result()
