"""GPU check: compile the suite's conv nets for ``cuda`` (and ``tensorrt``, structure only) and run them
on onnxruntime's CUDA provider.

On the GPU machine (``../shared/gpu/README.md`` brings onnxruntime-gpu there), from the project root:

    PYTHONPATH=/tmp/site:$PWD python3 benchmarks/gpu_check.py --out /tmp/gpu_check.json

For each model (resnet18, mobilenet_v2, as ``benchmarks/cases.py`` builds them):

- ``cuda``: the fp16 model is compiled (on the CPU: calibration runs there), then float and compiled
  run on the CUDA provider. Reported: SQNR of each against the CPU provider's *float* output (the
  issue's bar: ≥ 30 dB), latency at batch 1 and 32 (medians of interleaved runs), and from
  onnxruntime's profile the nodes placed on the CPU and the Memcpy nodes inside each model.
- ``tensorrt``: compiled and structure-checked only (TensorRT's libraries are not on that machine).

Prints a markdown table and writes JSON. Without a usable CUDA provider it writes
``{"skipped": <reason>}`` and exits 0 (``--provider cpu`` runs every step on the CPU instead, to
check the script itself). This is a measurement, not a test: nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MIN_SQNR_DB = 30.0  # issue 5: every model verifies against the CPU provider's float output


def cuda_unusable() -> str | None:
    """Why the CUDA provider cannot run here, or None when it can."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return f"onnxruntime {ort.__version__} offers {', '.join(ort.get_available_providers())}: no CUDA provider (install onnxruntime-gpu)"
    from qcompile.verify import cuda_available

    if not cuda_available():
        return "onnxruntime-gpu is installed but a CUDA session falls back to the CPU (CUDA/cuDNN libraries not found?)"
    return None


def gpu_name() -> str | None:
    """The GPU's name (for the results file), from torch or nvidia-smi; None where neither says."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except ImportError:
        pass
    import subprocess

    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else None


def _concat(outputs: list[list[np.ndarray]]) -> np.ndarray:
    return np.concatenate([o[0].reshape(o[0].shape[0], -1) for o in outputs])


def check_target(case, target: str, provider: str, batches: tuple[int, ...], runs: int, cpu_float: np.ndarray) -> dict[str, Any]:
    """One (model, target) row: compile, then (cuda) accuracy, placement and latency on ``provider``."""
    import qcompile
    from qcompile.verify import measure_latency, run_model
    from qcompile.verify.latency import batched_feed
    from qcompile.verify.metrics import compare_arrays, json_float
    from qcompile.verify.placement import node_placement

    options = qcompile.CompileOptions(
        target=target, show_progress=False, verification=qcompile.VerificationOptions(latency=False)
    )
    result = qcompile.compile_model(case.model, case.calibration, options, verify_data=case.evaluation)
    report = result.report.to_json()
    row: dict[str, Any] = {
        "model": case.name,
        "target": target,
        "float_bytes": report["size"]["float_bytes"],
        "compiled_bytes": report["size"]["quantized_bytes"],
        "cpu_verification_sqnr_db": report["verification"]["min_sqnr_db"],
        "target_note": report["target"]["note"],
    }
    if "structure" in report["target"]:
        row["structure_passed"] = report["target"]["structure"]["passed"]
        row["structure_problems"] = report["target"]["structure"]["problems"][:5]
    if "precision" in report["target"]:
        row["precision"] = report["target"]["precision"]
    if target == "tensorrt":
        return row  # structure only: TensorRT itself is not run
    models = {"float": case.model, "compiled": result.model}
    for label, model in models.items():
        on_provider = _concat(list(run_model(model, case.evaluation, provider)))
        # None: identical outputs (infinite SQNR), as in every qcompile JSON.
        row[f"{label}_sqnr_vs_cpu_float_db"] = json_float(compare_arrays(cpu_float, on_provider, label).sqnr_db)
        placement = node_placement(model, case.latency_feed, provider).to_json()
        row[f"{label}_memcpy_nodes"] = placement["memcpy_nodes"]
        row[f"{label}_cpu_nodes"] = placement["cpu_nodes"]
    fixed = {name: None for name in case.latency_feed}
    for batch in batches:
        feed = batched_feed(case.latency_feed, fixed, batch)
        latency = measure_latency(models, feed, provider=provider, runs=runs, warmup=10)
        row[f"b{batch}_float_ms"] = latency["float"].median_ms
        row[f"b{batch}_compiled_ms"] = latency["compiled"].median_ms
        row[f"b{batch}_speedup"] = latency["float"].median_ms / latency["compiled"].median_ms
    sqnr = row["compiled_sqnr_vs_cpu_float_db"]
    row["passed"] = (sqnr is None or sqnr >= MIN_SQNR_DB) and row["compiled_memcpy_nodes"] == 0
    return row


def _db(value: float | None) -> str:
    return "inf" if value is None else f"{value:.1f}"


def table(rows: list[dict[str, Any]], batches: tuple[int, ...]) -> str:
    head = ["model", "target", "SQNR vs CPU float (dB)", "memcpy", "CPU nodes"]
    head += [f"b{b} float / compiled ms (speedup)" for b in batches] + ["size MiB", "check"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r["target"] == "tensorrt":
            cells = [r["model"], r["target"], "-", "-", "-"] + ["-"] * len(batches)
            check = "structure " + ("passed" if r.get("structure_passed") else f"FAILED: {r.get('structure_problems')}")
        else:
            cells = [r["model"], r["target"], f"{_db(r['compiled_sqnr_vs_cpu_float_db'])} (float {_db(r['float_sqnr_vs_cpu_float_db'])})",
                     str(r["compiled_memcpy_nodes"]), str(sum(r["compiled_cpu_nodes"].values()))]
            cells += [f"{r[f'b{b}_float_ms']:.3f} / {r[f'b{b}_compiled_ms']:.3f} ({r[f'b{b}_speedup']:.2f}x)" for b in batches]
            check = "passed" if r["passed"] else "FAILED"
        cells += [f"{r['compiled_bytes'] / 2**20:.1f}", check]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON result file (the table goes next to it as .md)")
    parser.add_argument("--models", nargs="+", default=["resnet18", "mobilenet_v2"])
    parser.add_argument("--targets", nargs="+", default=["cuda", "tensorrt"], choices=["cuda", "tensorrt"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 32])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--provider", choices=["cuda", "cpu"], default="cuda",
                        help="cpu: run every step on the CPU provider (checks the script, measures nothing about GPUs)")
    parser.add_argument("--quick", action="store_true", help="the cases' small data (smoke runs)")
    args = parser.parse_args(argv)

    import onnxruntime as ort

    if hasattr(ort, "preload_dlls"):
        ort.preload_dlls()
    out: dict[str, Any] = {"onnxruntime": ort.__version__, "providers": ort.get_available_providers(),
                           "python": platform.python_version(), "provider": args.provider, "gpu": gpu_name()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    reason = cuda_unusable() if args.provider == "cuda" else None
    if reason is not None:
        out["skipped"] = reason
        args.out.write_text(json.dumps(out, indent=2, allow_nan=False))
        print(f"skipped: {reason}")
        return 0

    from benchmarks import cases
    from qcompile.verify import run_model

    batches = tuple(args.batches)
    rows: list[dict[str, Any]] = []
    out["models"] = rows
    for name in args.models:
        case = cases.CASES[name](args.quick)
        cpu_float = _concat(list(run_model(case.model, case.evaluation, "cpu")))
        for target in args.targets:
            row = check_target(case, target, args.provider, batches, args.runs, cpu_float)
            rows.append(row)
            print(json.dumps(row), flush=True)
            args.out.write_text(json.dumps(out, indent=2, allow_nan=False))  # what is done survives a later failure
    text = table(rows, batches)
    args.out.with_suffix(".md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
