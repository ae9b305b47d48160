"""Quantize ResNet-18 with qcompile and measure what quantization changed.

The weights are random (nothing is downloaded), so BatchNorm statistics are re-estimated on
synthetic images first: without that a random network's activations grow layer after layer and
look nothing like a trained network's, and the quantization numbers would mean little.

    python examples/resnet18.py
"""

from __future__ import annotations

import time

import numpy as np
import onnxruntime as ort
import torch
from models import ResNet18, reestimate_batchnorm, synthetic_images

import qcompile
from qcompile.frontends.torch_export import export_torch
from qcompile.options import CompileOptions

IMAGE_SIZE = 224
CALIBRATION_IMAGES = 32
HELD_OUT_IMAGES = 16


def sqnr_db(reference: np.ndarray, candidate: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio: 10·log10(Σ ref² / Σ (ref − candidate)²)."""
    reference = reference.astype(np.float64)
    noise = np.sum((reference - candidate) ** 2)
    return float("inf") if noise == 0 else float(10 * np.log10(np.sum(reference**2) / noise))


def run(model, images: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"image": images})[0]


def main() -> None:
    start = time.perf_counter()
    torch.manual_seed(0)
    net = ResNet18()
    # Four batches of eight synthetic images give every BatchNorm the statistics of this "data set".
    reestimate_batchnorm(net, (synthetic_images(8, IMAGE_SIZE, seed=i) for i in range(4)))

    float_model = export_torch(
        net, synthetic_images(2, IMAGE_SIZE), input_names=["image"], output_names=["logits"]
    )
    calibration = synthetic_images(CALIBRATION_IMAGES, IMAGE_SIZE, seed=100).numpy()
    held_out = synthetic_images(HELD_OUT_IMAGES, IMAGE_SIZE, seed=200).numpy()

    # Calibration data: a list of feeds, one {input name: batch} per batch.
    feeds = [{"image": calibration[i : i + 8]} for i in range(0, len(calibration), 8)]
    result = qcompile.compile_model(float_model, feeds, CompileOptions())
    print(result.report.render_text())

    reference = run(float_model, held_out)
    quantized = run(result.model, held_out)
    agreement = float(np.mean(reference.argmax(axis=1) == quantized.argmax(axis=1)))
    print(f"held-out images: {HELD_OUT_IMAGES} synthetic, {IMAGE_SIZE}x{IMAGE_SIZE}")
    print(f"output SQNR vs float: {sqnr_db(reference, quantized):.1f} dB")
    print(f"top-1 agreement with float: {agreement:.1%}")
    print(f"total time: {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
