"""Compare calibration range methods (activations) and weight methods on four models.

    python benchmarks/calibration_methods.py --out benchmarks/results/calibration_methods.json

Models (all float32 → int8 QDQ with qcompile's defaults except the two methods compared):
- digits: the trained digits CNN (``qcompile.demo``): test accuracy and logits SQNR on held-out digits;
- resnet18, mobilenet_v2 (``examples/models.py``): random weights, BatchNorm re-estimated on synthetic
  images; logits SQNR, cosine and top-1 agreement with float on 48 held-out synthetic images;
- transformer: Embedding → 2 × torch.nn.TransformerEncoderLayer → Linear over a 1,000-token vocabulary
  (random weights), exported with a dynamic sequence axis; logits SQNR and cosine on held-out random
  token sequences of other lengths.

Prints a table and writes JSON. A measurement, not a test: nothing here asserts a number.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

ACTIVATION_METHODS = ("minmax", "percentile", "entropy", "mse")
WEIGHT_METHODS = ("minmax", "mse")


@dataclass
class Case:
    name: str
    model: object  # onnx.ModelProto
    calibration: list[dict[str, np.ndarray]]
    held_out: list[dict[str, np.ndarray]]
    labels: np.ndarray | None = None  # digits only: accuracy


def _digits() -> Case:
    from qcompile.demo import train_digits_cnn

    demo = train_digits_cnn(seed=0)
    calib = [{"image": demo.calibration_images[i : i + 32]} for i in range(0, len(demo.calibration_images), 32)]
    test = [{"image": demo.test_images}]
    return Case("digits", demo.model, calib, test, labels=demo.test_labels)


def _vision(name: str) -> Case:
    import torch
    from models import MobileNetV2, ResNet18, reestimate_batchnorm, synthetic_images

    from qcompile.frontends.torch_export import export_torch

    torch.manual_seed(0)
    net = {"resnet18": ResNet18, "mobilenet_v2": MobileNetV2}[name]()
    reestimate_batchnorm(net, (synthetic_images(8, 224, seed=i) for i in range(4)))
    model = export_torch(net, synthetic_images(2, 224), input_names=["image"], output_names=["logits"])
    calib = synthetic_images(32, 224, seed=100).numpy()
    held = synthetic_images(48, 224, seed=200).numpy()
    return Case(
        name,
        model,
        [{"image": calib[i : i + 8]} for i in range(0, 32, 8)],
        [{"image": held[i : i + 8]} for i in range(0, 48, 8)],
    )


def _transformer() -> Case:
    import torch

    from qcompile import export_torch

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Embedding(1000, 128)
            self.layers = torch.nn.ModuleList(
                [torch.nn.TransformerEncoderLayer(128, 4, 512, dropout=0.0, batch_first=True) for _ in range(2)]
            )
            self.head = torch.nn.Linear(128, 1000)

        def forward(self, ids):
            x = self.embed(ids)
            for layer in self.layers:
                x = layer(x)
            return self.head(x)

    torch.manual_seed(0)
    net = Encoder().eval()
    model = export_torch(net, (torch.randint(0, 1000, (2, 16)),), input_names=["ids"], dynamic_axes={"ids": {1: "sequence"}})
    rng = np.random.default_rng(0)
    calib = [{"ids": rng.integers(0, 1000, (4, 32), dtype=np.int64)} for _ in range(16)]
    held = [{"ids": rng.integers(0, 1000, (4, length), dtype=np.int64)} for length in (24, 40, 48, 64, 20, 56)]
    return Case("transformer", model, calib, held)


CASES: dict[str, Callable[[], Case]] = {
    "digits": _digits,
    "resnet18": lambda: _vision("resnet18"),
    "mobilenet_v2": lambda: _vision("mobilenet_v2"),
    "transformer": _transformer,
}


def _outputs(model, feeds: list[dict[str, np.ndarray]]) -> np.ndarray:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    # Rows of logits: (batch, classes), or (batch × sequence, vocabulary) for the transformer.
    outputs = [session.run(None, feed)[0] for feed in feeds]
    return np.concatenate([out.reshape(-1, out.shape[-1]) for out in outputs])


def _metrics(case: Case, reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    ref, cand = reference.astype(np.float64), candidate.astype(np.float64)
    noise = np.sum((ref - cand) ** 2)
    out = {
        "sqnr_db": float(10 * np.log10(np.sum(ref**2) / noise)) if noise else float("inf"),
        "cosine": float(np.sum(ref * cand) / np.sqrt(np.sum(ref**2) * np.sum(cand**2))),
        "top1_agreement": float(np.mean(ref.argmax(1) == cand.argmax(1))),
    }
    if case.labels is not None:
        out["accuracy"] = float(np.mean(cand.argmax(1) == case.labels))
        out["float_accuracy"] = float(np.mean(ref.argmax(1) == case.labels))
    return out


def _configs(weights: bool) -> Iterator[tuple[str, str]]:
    for method in ACTIVATION_METHODS:
        yield method, "minmax"
    if weights:
        for method in ACTIVATION_METHODS:
            yield method, "mse"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--models", nargs="*", default=list(CASES))
    parser.add_argument("--no-weight-methods", action="store_true", help="Only activation methods (weights minmax).")
    args = parser.parse_args()

    import qcompile
    from qcompile.options import CalibrationOptions, CompileOptions, VerificationOptions

    rows = []
    for name in args.models:
        case = CASES[name]()
        reference = _outputs(case.model, case.held_out)
        for method, weight_method in _configs(not args.no_weight_methods):
            options = CompileOptions(
                calibration=CalibrationOptions(method=method, weight_method=weight_method),
                verification=VerificationOptions(enabled=False),
                show_progress=False,
            )
            start = time.perf_counter()
            result = qcompile.compile_model(case.model, case.calibration, options)
            seconds = time.perf_counter() - start
            row = {"model": name, "method": method, "weight_method": weight_method, "compile_seconds": round(seconds, 2)}
            row.update(_metrics(case, reference, _outputs(result.model, case.held_out)))
            rows.append(row)
            extra = f"  acc {row['accuracy']:.4f} (float {row['float_accuracy']:.4f})" if "accuracy" in row else ""
            print(
                f"{name:13s} act={method:10s} w={weight_method:6s} SQNR {row['sqnr_db']:6.2f} dB  "
                f"cos {row['cosine']:.5f}  top1 {row['top1_agreement']:.3f}{extra}  {seconds:.1f}s",
                flush=True,
            )
    if args.out:
        meta = {"machine": platform.platform(), "processor": platform.processor(), "onnxruntime": ort.__version__}
        args.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
