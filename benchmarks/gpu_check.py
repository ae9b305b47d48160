"""GPU check: compile on CPU, then run float and quantized models on onnxruntime's CUDA provider.

Run on a machine with onnxruntime-gpu:  python benchmarks/gpu_check.py --out results.json
For each model: output SQNR of the quantized model vs float, both on CUDA; CUDA vs CPU agreement of
each model; latency (median of interleaved runs) of float and quantized at batch 1 and 32. Prints a
table and writes JSON. This is a measurement, not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))


def _models():
    import torch
    from models import MobileNetV2, ResNet18, reestimate_batchnorm, synthetic_images

    for name, cls in (("resnet18", ResNet18), ("mobilenet_v2", MobileNetV2)):
        torch.manual_seed(0)
        module = cls().eval()
        images = synthetic_images(48, 224, seed=0)
        reestimate_batchnorm(module, [images[i : i + 16] for i in range(0, 48, 16)])
        yield name, module, images


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    import qcompile
    from qcompile.verify import compare_models, cuda_available, measure_latency
    from qcompile.verify.metrics import compare_arrays

    rows = []
    out = {"onnxruntime": ort.__version__, "providers": ort.get_available_providers(), "cuda": cuda_available(),
           "python": platform.python_version(), "models": rows}
    for name, module, images in _models():
        float_model = qcompile.export_torch(module, images[:1], input_names=["image"], output_names=["logits"])
        calib = [{"image": images[i : i + 1].numpy()} for i in range(32)]
        held_out = [{"image": images[i : i + 1].numpy()} for i in range(32, 48)]
        result = qcompile.compile_model(float_model, calib, qcompile.CompileOptions(show_progress=False), verify_data=held_out)
        row = {"model": name, "cpu_sqnr_db": result.verification.outputs[0].sqnr_db}
        if cuda_available():
            on_cuda = compare_models(float_model, result.model, held_out, provider="cuda")
            row["cuda_sqnr_db"] = on_cuda.outputs[0].sqnr_db
            for label, model in (("float", float_model), ("quant", result.model)):
                from qcompile.verify.compare import run_model

                cpu = np.concatenate([o[0] for o in run_model(model, held_out[:4], "cpu")])
                gpu = np.concatenate([o[0] for o in run_model(model, held_out[:4], "cuda")])
                row[f"{label}_cuda_vs_cpu_sqnr_db"] = compare_arrays(cpu, gpu, label).sqnr_db
            for batch in (1, 32):
                feed = {"image": np.concatenate([images[i : i + 1].numpy() for i in range(batch)])[:batch]}
                lat = measure_latency({"float": float_model, "quant": result.model}, feed, provider="cuda", runs=50)
                row[f"cuda_b{batch}_float_ms"] = lat["float"].median_ms
                row[f"cuda_b{batch}_quant_ms"] = lat["quant"].median_ms
        rows.append(row)
        print(json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    keys = sorted({k for r in rows for k in r} - {"model"})
    print("| model | " + " | ".join(keys) + " |")
    for r in rows:
        print(f"| {r['model']} | " + " | ".join(f"{r.get(k, float('nan')):.3g}" for k in keys) + " |")


if __name__ == "__main__":
    main()
