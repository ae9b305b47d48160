"""Train the digits CNN, quantize it with qcompile, and compare the two models' accuracy.

The whole loop in one script: train (a few seconds on CPU), export to ONNX with BatchNormalization
and Dropout in the graph, compile with the held-out calibration images, test both models.

    python examples/digits_cnn.py
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort

import qcompile
from qcompile.demo import accuracy, train_digits_cnn
from qcompile.options import CompileOptions


def predict(model, images: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"image": images})[0]


def main() -> None:
    demo = train_digits_cnn(seed=0)
    print(f"trained in {demo.train_seconds:.1f} s; torch test accuracy {demo.float_accuracy:.2%}")

    # Calibration uses its own split of the digits, never the test images.
    feeds = [{"image": batch} for batch in np.array_split(demo.calibration_images, 6)]
    result = qcompile.compile_model(demo.model, feeds, CompileOptions())
    print(result.report.render_text())

    float_accuracy = accuracy(predict(demo.model, demo.test_images), demo.test_labels)
    int8_accuracy = accuracy(predict(result.model, demo.test_images), demo.test_labels)
    print(f"test images: {len(demo.test_images)}")
    print(f"float ONNX accuracy:     {float_accuracy:.2%}")
    print(f"quantized ONNX accuracy: {int8_accuracy:.2%} ({(int8_accuracy - float_accuracy) * 100:+.2f} points)")


if __name__ == "__main__":
    main()
