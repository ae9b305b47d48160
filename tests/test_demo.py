"""The built-in digits demo: it trains, its export has BN and Dropout, onnxruntime agrees with torch."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from qcompile.demo import accuracy, load_digits_splits
from qcompile.errors import UsageError
from tests.helpers import count_ops, run

pytest.importorskip("torch")
pytest.importorskip("sklearn")


@pytest.fixture(scope="module")
def demo():
    from qcompile.demo import train_digits_cnn

    return train_digits_cnn(seed=0)


def test_training_reaches_the_accuracy_the_demo_promises(demo):
    assert demo.float_accuracy >= 0.93
    assert demo.train_seconds > 0  # the time is reported (measured 2-5 s on two cores; timings are not asserted)


def test_export_has_batchnorm_dropout_and_the_demo_names(demo):
    ops = count_ops(demo.model)
    assert ops["BatchNormalization"] == 3
    assert ops["Dropout"] == 1
    assert [i.name for i in demo.model.graph.input] == ["image"]
    assert [o.name for o in demo.model.graph.output] == ["logits"]
    assert demo.model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def test_onnxruntime_accuracy_equals_torch_accuracy(demo):
    (logits,) = run(demo.model, {"image": demo.test_images})
    assert abs(accuracy(logits, demo.test_labels) - demo.float_accuracy) <= 0.005


def test_the_module_is_returned_in_eval_mode(demo):
    assert not any(m.training for m in demo.module.modules())


def test_splits_are_disjoint_stratified_scaled_and_seeded():
    data = load_digits_splits(seed=0)
    train, calib, test = data["train_images"], data["calibration_images"], data["test_images"]
    assert len(train) + len(calib) + len(test) == 1797
    assert abs(len(calib) - 0.2 * 1797) <= 1 and abs(len(test) - 0.2 * 1797) <= 1
    assert calib.dtype == np.float32 and calib.shape[1:] == (1, 8, 8)
    assert 0.0 <= float(train.min()) and float(train.max()) == 1.0
    # No image is in two splits (the digits data has no exact duplicates across them).
    rows = {split: {x.tobytes() for x in images} for split, images in (("train", train), ("calib", calib), ("test", test))}
    assert not rows["train"] & rows["test"] and not rows["calib"] & rows["test"] and not rows["train"] & rows["calib"]
    # Stratified: every digit in every split, in proportions within a point of each other.
    for labels in (data["train_labels"], data["calibration_labels"], data["test_labels"]):
        assert np.all(np.abs(np.bincount(labels, minlength=10) / len(labels) - 0.1) < 0.015)
    again = load_digits_splits(seed=0)
    np.testing.assert_array_equal(again["test_images"], test)
    assert not np.array_equal(load_digits_splits(seed=1)["test_labels"], data["test_labels"])


def test_accuracy():
    logits = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7], [0.6, 0.4]])
    assert accuracy(logits, [1, 0, 0, 0]) == 0.75
    with pytest.raises(UsageError):
        accuracy(logits, [1, 0])


def test_importing_the_demo_needs_no_torch_and_training_says_how_to_install_it():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import qcompile.demo\n"
        "from qcompile.errors import UsageError\n"
        "try:\n"
        "    qcompile.demo.train_digits_cnn()\n"
        "except UsageError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "PyTorch is not installed" in out


@pytest.mark.slow
def test_the_same_seed_trains_the_same_weights(demo):
    from qcompile.demo import train_digits_cnn

    again = train_digits_cnn(seed=0)
    for (name, a), (_, b) in zip(demo.module.state_dict().items(), again.module.state_dict().items()):
        np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=name)


@pytest.mark.slow
def test_run_demo_writes_both_models_and_keeps_the_accuracy(tmp_path):
    from qcompile.demo import run_demo

    outcome = run_demo(tmp_path / "out", seed=0, show_progress=False)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "digits_cnn.int8.onnx",
        "digits_cnn.int8.onnx.report.json",
        "digits_cnn.onnx",
    ]
    assert abs(outcome.float_onnx_accuracy - outcome.demo.float_accuracy) <= 0.005
    # What the demo promises: within 1 point of float, at least 3x smaller on disk.
    assert outcome.quantized_accuracy >= outcome.float_onnx_accuracy - 0.01
    assert outcome.float_path.stat().st_size >= 3 * outcome.quantized_path.stat().st_size
    counts = count_ops(outcome.result.model)
    assert counts["Dropout"] == 0 and counts["BatchNormalization"] == 0 and counts["QuantizeLinear"] > 0
    # One int32 bias per Conv (3) and Gemm (1).
    int32 = [t for t in outcome.result.model.graph.initializer if t.data_type == 6 and t.name.endswith("_quantized")]
    assert len(int32) == 4
    # The report's node counts show both folded away.
    passes = {p.name: p for p in outcome.result.report.passes}
    assert passes["remove_dropout"].nodes_before - passes["remove_dropout"].nodes_after == 1
    assert passes["fold_batchnorm"].nodes_before - passes["fold_batchnorm"].nodes_after == 3
    text = outcome.render_text()
    assert f"{outcome.quantized_accuracy:.2%}" in text and str(outcome.quantized_path) in text
