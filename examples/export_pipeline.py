"""qcompile as one step of an export script: torch model → ONNX → quantized ONNX on disk.

Replace ``load_trained_model`` and ``calibration_loader`` with your model and a DataLoader over a
few hundred representative inputs (labels, if the loader yields them, must be left out); the rest
stays as it is.

    python examples/export_pipeline.py --out /path/to/folder
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from torch.utils.data import DataLoader, TensorDataset

import qcompile
from qcompile.demo import load_digits_splits, train_digits_cnn
from qcompile.frontends.torch_export import export_torch


def load_trained_model() -> torch.nn.Module:
    """Stands in for loading your checkpoint: here, the digits CNN trained in a few seconds."""
    return train_digits_cnn(seed=0).module


def calibration_loader() -> DataLoader:
    """Your calibration inputs, batched as your training code batches them: each item is (images,)."""
    images = torch.from_numpy(load_digits_splits(seed=0)["calibration_images"])
    return DataLoader(TensorDataset(images), batch_size=64, shuffle=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: a new temporary folder)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing model in the output folder")
    args = parser.parse_args()
    out = args.out if args.out is not None else Path(tempfile.mkdtemp(prefix="qcompile-export-"))
    out.mkdir(parents=True, exist_ok=True)
    target = out / "model.int8.onnx"
    if target.exists() and not args.force:  # say so before minutes of work, not after
        parser.error(f"{target} exists; pass --force to overwrite it")

    model = load_trained_model()
    loader = calibration_loader()
    (example,) = next(iter(loader))

    float_model = export_torch(model, example[:2], input_names=["image"], output_names=["logits"])
    # The DataLoader is the calibration data: each batch's tensors map, in order, onto the inputs.
    result = qcompile.compile_model(float_model, loader, qcompile.CompileOptions())
    print(result.report.render_text())

    # Writes the report beside the model, then the model, each atomically.
    path = result.save(target, force=args.force)
    print(f"quantized model: {path}")
    print(f"report:          {path}.report.json")


if __name__ == "__main__":
    try:
        main()
    except qcompile.QcompileError as exc:
        # qcompile's errors are one line a user can act on; the exit code says which kind.
        print(f"error: {exc}")
        raise SystemExit(exc.exit_code) from None
