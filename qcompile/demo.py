"""The built-in example: a small CNN trained in seconds on scikit-learn's digits, exported to ONNX.

Used by ``qcompile demo``, the examples and the tests. The data set ships inside scikit-learn
(``sklearn.datasets.load_digits``: 1,797 8x8 grayscale digits with pixel values 0..16), so
nothing is downloaded. torch and scikit-learn are imported inside the functions that need them:
``import qcompile.demo`` works without them, training without them raises UsageError.

The network has what qcompile's float clean-up is for: BatchNormalization after every convolution
(folded by qcompile, so the export keeps it) and a Dropout before the classifier (written into the
ONNX model as an inference Dropout, which the exporters leave out; see
``qcompile.frontends.torch_export``).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from qcompile.errors import UsageError
from qcompile.frontends.torch_export import import_torch

if TYPE_CHECKING:
    import torch

    from qcompile.api import CompileResult

INPUT_NAME = "image"
OUTPUT_NAME = "logits"
NUM_CLASSES = 10
DROPOUT = 0.2
# Fractions of the 1,797 digits; the rest (60%) trains. Stratified, so every split has every digit.
CALIBRATION_FRACTION = 0.2
TEST_FRACTION = 0.2
EPOCHS = 15
BATCH_SIZE = 32
LEARNING_RATE = 3e-3


@dataclass(frozen=True)
class DigitsDemo:
    """A trained digits CNN, its ONNX export and the data to calibrate and test it with."""

    module: torch.nn.Module  # in eval mode
    model: onnx.ModelProto  # input "image" (batch, 1, 8, 8), output "logits" (batch, 10)
    calibration_images: np.ndarray  # float32 (N, 1, 8, 8) in [0, 1]
    test_images: np.ndarray  # float32 (N, 1, 8, 8) in [0, 1]
    test_labels: np.ndarray  # int64 (N,)
    float_accuracy: float  # of ``module`` on the test images, in [0, 1]
    train_seconds: float


@dataclass(frozen=True)
class DemoOutcome:
    """What ``qcompile demo`` did: the trained demo, its compile, the files written, the accuracies."""

    demo: DigitsDemo
    result: CompileResult
    float_path: Path
    quantized_path: Path
    float_onnx_accuracy: float
    quantized_accuracy: float

    def render_text(self) -> str:
        d = self.demo
        lines = [
            f"digits CNN trained in {d.train_seconds:.1f} s; test accuracy (torch) {d.float_accuracy:.2%}",
            "",
            self.result.report.render_text(),
            "",
            f"test accuracy on {len(d.test_labels)} held-out digits:",
            f"  float ONNX      {self.float_onnx_accuracy:.2%}",
            f"  quantized ONNX  {self.quantized_accuracy:.2%} "
            f"({(self.quantized_accuracy - self.float_onnx_accuracy) * 100:+.2f} points)",
            "",
            f"float model:     {self.float_path}",
            f"quantized model: {self.quantized_path} (report beside it)",
        ]
        return "\n".join(lines)


def accuracy(logits: np.ndarray, labels: Any) -> float:
    """Fraction of rows of ``logits`` (N, classes) whose largest entry is at the row's label."""
    logits = np.asarray(logits)
    labels = np.asarray(labels).reshape(-1)
    if logits.ndim != 2 or logits.shape[0] != labels.shape[0]:
        raise UsageError(f"accuracy needs logits (N, classes) and N labels, got {logits.shape} and {labels.shape}")
    if labels.size == 0:
        raise UsageError("accuracy of an empty set is undefined")
    return float(np.mean(np.argmax(logits, axis=1) == labels))


def load_digits_splits(seed: int = 0) -> dict[str, np.ndarray]:
    """The digits as float32 (N, 1, 8, 8) in [0, 1] with int64 labels, split train/calibration/test.

    Keys: ``train_images``, ``train_labels``, ``calibration_images``, ``calibration_labels``,
    ``test_images``, ``test_labels``.
    """
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError:
        raise UsageError("scikit-learn is not installed: pip install 'qcompile[torch]'") from None
    digits = load_digits()
    images = (digits.images / 16.0).astype(np.float32)[:, None, :, :]
    labels = digits.target.astype(np.int64)
    rest_x, test_x, rest_y, test_y = train_test_split(
        images, labels, test_size=TEST_FRACTION, stratify=labels, random_state=seed
    )
    train_x, calib_x, train_y, calib_y = train_test_split(
        rest_x, rest_y, test_size=CALIBRATION_FRACTION / (1.0 - TEST_FRACTION), stratify=rest_y, random_state=seed
    )
    return {
        "train_images": train_x,
        "train_labels": train_y,
        "calibration_images": calib_x,
        "calibration_labels": calib_y,
        "test_images": test_x,
        "test_labels": test_y,
    }


def build_digits_cnn() -> torch.nn.Module:
    """Conv-BN-ReLU ×2, MaxPool, Conv-BN-ReLU, global average pool, Dropout, Linear: 14k parameters."""
    torch = import_torch()
    from collections import OrderedDict

    nn = torch.nn
    return nn.Sequential(
        OrderedDict(
            [
                ("conv1", nn.Conv2d(1, 16, 3, padding=1)),
                ("bn1", nn.BatchNorm2d(16)),
                ("relu1", nn.ReLU()),
                ("conv2", nn.Conv2d(16, 32, 3, padding=1)),
                ("bn2", nn.BatchNorm2d(32)),
                ("relu2", nn.ReLU()),
                ("pool", nn.MaxPool2d(2)),
                ("conv3", nn.Conv2d(32, 32, 3, padding=1)),
                ("bn3", nn.BatchNorm2d(32)),
                ("relu3", nn.ReLU()),
                ("gap", nn.AdaptiveAvgPool2d(1)),
                ("flatten", nn.Flatten()),
                ("dropout", nn.Dropout(DROPOUT)),
                ("fc", nn.Linear(32, NUM_CLASSES)),
            ]
        )
    )


def train_digits_cnn(seed: int = 0) -> DigitsDemo:
    """Train the digits CNN on two CPU threads (seeded: same seed, same weights), export it.

    The global torch RNG and thread count are restored afterwards.
    """
    torch = import_torch()
    import os

    from qcompile.frontends.torch_export import export_torch, insert_dropout

    data = load_digits_splits(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            module = build_digits_cnn()
            start = time.perf_counter()
            _train(module, data["train_images"], data["train_labels"], torch)
            train_seconds = time.perf_counter() - start
        module.eval()
        with torch.no_grad():
            float_logits = module(torch.from_numpy(data["test_images"])).numpy()
    finally:
        torch.set_num_threads(threads)

    model = export_torch(
        module,
        torch.from_numpy(data["calibration_images"][:2]),
        input_names=[INPUT_NAME],
        output_names=[OUTPUT_NAME],
        dynamic_batch=True,
        keep_batchnorm=True,
    )
    # The Dropout module sits right before the classifier, so its input is the Gemm's input.
    classifier = next(node for node in model.graph.node if node.op_type == "Gemm")
    model = insert_dropout(model, after_output=classifier.input[0], ratio=DROPOUT)
    return DigitsDemo(
        module=module,
        model=model,
        calibration_images=data["calibration_images"],
        test_images=data["test_images"],
        test_labels=data["test_labels"],
        float_accuracy=accuracy(float_logits, data["test_labels"]),
        train_seconds=train_seconds,
    )


def _train(module: Any, images: np.ndarray, labels: np.ndarray, torch: Any) -> None:
    """Adam with a one-cycle learning rate; small batches suit the 1,078 training digits."""
    x = torch.from_numpy(images)
    y = torch.from_numpy(labels)
    steps_per_epoch = (len(x) + BATCH_SIZE - 1) // BATCH_SIZE
    optimizer = torch.optim.Adam(module.parameters(), lr=LEARNING_RATE)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=LEARNING_RATE * 3, epochs=EPOCHS, steps_per_epoch=steps_per_epoch
    )
    loss_fn = torch.nn.CrossEntropyLoss()
    module.train()
    for _ in range(EPOCHS):
        order = torch.randperm(len(x))
        for i in range(0, len(x), BATCH_SIZE):
            batch = order[i : i + BATCH_SIZE]
            optimizer.zero_grad()
            loss_fn(module(x[batch]), y[batch]).backward()
            optimizer.step()
            schedule.step()


def run_demo(out_dir: str | Path | None = None, *, seed: int = 0, show_progress: bool = True) -> DemoOutcome:
    """Train, export, compile (calibrating on the calibration split, verifying on the test split), save.

    Writes ``digits_cnn.onnx``, ``digits_cnn.int8.onnx`` and its report into ``out_dir`` (a new
    temporary folder when None), replacing earlier files of these names: they are the demo's own.
    """
    from qcompile.api import compile_model
    from qcompile.graph.io import save_model_atomic
    from qcompile.options import CompileOptions
    from qcompile.verify.compare import run_model

    out = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="qcompile-demo-"))
    out.mkdir(parents=True, exist_ok=True)
    demo = train_digits_cnn(seed)
    calibration = [{INPUT_NAME: batch} for batch in np.array_split(demo.calibration_images, 6)]
    test_feeds = [{INPUT_NAME: batch} for batch in np.array_split(demo.test_images, 6)]
    result = compile_model(demo.model, calibration, CompileOptions(show_progress=show_progress), verify_data=test_feeds)

    def test_accuracy(model: onnx.ModelProto) -> float:
        logits = np.concatenate([outputs[0] for outputs in run_model(model, test_feeds)])
        return accuracy(logits, demo.test_labels)

    float_path = save_model_atomic(demo.model, out / "digits_cnn.onnx", force=True)
    quantized_path = result.save(out / "digits_cnn.int8.onnx", force=True)
    return DemoOutcome(
        demo=demo,
        result=result,
        float_path=float_path,
        quantized_path=quantized_path,
        float_onnx_accuracy=test_accuracy(demo.model),
        quantized_accuracy=test_accuracy(result.model),
    )
