"""qcompile beside onnxruntime's quantizer and NNCF on the same models and data, in one run.

    python benchmarks/run.py [--cases digits_cnn resnet18 ...] [--quick] --out benchmarks/results/NAME.json

Writes NAME.json (every number, the versions and the machine) and NAME.md (the tables), and prints
the tables. For each case (``benchmarks.cases``) and each configuration (``benchmarks.configs``):

1. compile, each in its own child process (``benchmarks.worker``), timed and its peak RSS read;
2. run every model that came out on the evaluation data and compute the case's metric against the
   float model's outputs (computed once);
3. time all models of the case interleaved at batch 1 with 1 and 2 intra-op threads.

A configuration that fails (at compile, load or run) is a row with its error; a peer whose package
is missing is a row saying so; a case whose packages are missing is skipped with the reason.
``--quick`` shrinks the data, the timing runs and the peer list (no Percentile/Entropy) for a
smoke test; its numbers are not for comparison.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
# Run as a script, this folder is sys.path[0]; import the package from the repo root instead, so
# that no module here shadows an installed one.
if sys.path and Path(sys.path[0]).resolve() == ROOT / "benchmarks":
    sys.path[0] = str(ROOT)
elif str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import onnx

from benchmarks import configs as configs_module
from benchmarks import measure, report
from benchmarks.cases import CASES, Case, MissingExtra

THREADS = (1, 2)


def settings(quick: bool) -> dict[str, Any]:
    """Latency budget per thread count and case, run bounds, compile timeout."""
    if quick:
        return {"budget_s": 1.0, "min_runs": 5, "max_runs": 50, "warmup": 2, "timeout_s": 300}
    return {"budget_s": 15.0, "min_runs": 20, "max_runs": 300, "warmup": 10, "timeout_s": 600}


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run_case(name: str, quick: bool) -> dict[str, Any]:
    start = time.perf_counter()
    log(f"[{name}] building the case")
    try:
        case = CASES[name](quick)
    except MissingExtra as exc:
        log(f"[{name}] skipped: {exc}")
        return {"name": name, "skipped": str(exc)}
    with tempfile.TemporaryDirectory(prefix=f"qcompile-bench-{name}-") as tmp:
        rows = _run_configs(case, Path(tmp), quick)
    return {
        "name": case.name,
        "description": case.description,
        "data": case.data,
        "columns": list(case.columns),
        "latency_feed": {k: list(v.shape) for k, v in case.latency_feed.items()},
        "rows": rows,
        "seconds": time.perf_counter() - start,
    }


def _run_configs(case: Case, tmp: Path, quick: bool) -> list[dict[str, Any]]:
    opts = settings(quick)
    float_path = tmp / "float.onnx"
    onnx.save(case.model, str(float_path))
    calibration = measure.save_feeds(case.calibration, tmp / "calibration")
    padded = measure.save_feeds(case.padded_calibration, tmp / "calibration_padded") if case.padded_calibration else None

    rows: dict[str, dict[str, Any]] = {}
    models: dict[str, Path] = {}
    for config in configs_module.configurations(case, quick=quick):
        row = rows[config.name] = {"config": config.name, "tool": config.tool, "params": config.params,
                                   "status": "ok", "error": None, "notes": []}
        if config.tool == "float":
            models[config.name] = float_path
            continue
        missing = configs_module.missing_requirement(config)
        if missing:
            row.update(status="not installed", error=missing)
            log(f"[{case.name}] {config.name}: not installed: {missing}")
            continue
        output = tmp / f"{config.name}.onnx"
        calib = padded if config.params.get("padded") else calibration
        m = measure.compile_in_child(config.tool, config.params, float_path, calib, output, opts["timeout_s"])
        row["notes"] = list(m.notes)
        row["compile"] = {"seconds": m.seconds, "process_seconds": m.process_seconds,
                          "peak_rss_kib": m.peak_rss_kib}
        if m.ok:
            models[config.name] = output
            log(f"[{case.name}] {config.name}: compiled in {m.seconds:.1f} s, peak RSS {(m.peak_rss_kib or 0) / 1024:.0f} MiB")
        else:
            row.update(status="failed", error=m.error)
            log(f"[{case.name}] {config.name}: FAILED: {m.error}")

    _evaluate(case, models, rows)
    _time(case, models, rows, opts)
    return list(rows.values())


def _evaluate(case: Case, models: dict[str, Path], rows: dict[str, dict[str, Any]]) -> None:
    """The metric of every model against the float outputs; a model onnxruntime cannot run fails its row."""
    reference = measure.run_outputs(models["float"], case.evaluation)
    float_size = models["float"].stat().st_size
    for name, path in list(models.items()):
        try:
            outputs = reference if name == "float" else measure.run_outputs(path, case.evaluation)
        except Exception as exc:  # onnxruntime errors derive from Exception only
            rows[name].update(status="failed", error=f"onnxruntime: {str(exc).splitlines()[0][:300]}")
            del models[name]
            log(f"[{case.name}] {name}: FAILED to run: {rows[name]['error']}")
            continue
        size = path.stat().st_size
        rows[name].update(metrics=case.metric(reference, outputs), size_bytes=size, size_ratio=float_size / size)
        if name != "float":
            rows[name]["form"] = measure.quantized_form(path)
            rows[name]["notes"].insert(0, rows[name]["form"])


def _time(case: Case, models: dict[str, Path], rows: dict[str, dict[str, Any]], opts: dict[str, Any]) -> None:
    from qcompile.errors import InvalidDataError

    log(f"[{case.name}] timing {len(models)} models interleaved")
    while True:
        try:
            results = measure.latency(models, case.latency_feed, THREADS, budget_s=opts["budget_s"],
                                      min_runs=opts["min_runs"], max_runs=opts["max_runs"], warmup=opts["warmup"])
            break
        except InvalidDataError as exc:  # names the model that cannot run the latency feed: drop it, retry
            bad = next((n for n in models if repr(n) in str(exc)), None)
            if bad is None or bad == "float":
                raise
            rows[bad].update(status="failed", error=str(exc))
            del models[bad]
    for name in models:
        rows[name]["latency"] = {}
        for threads, per_model in results.items():
            lat = per_model[name].to_json()
            lat["speedup"] = per_model["float"].median_ms / lat["median_ms"]
            rows[name]["latency"][str(threads)] = lat


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES), metavar="CASE",
                        help=f"cases to run (default: all of {', '.join(CASES)})")
    parser.add_argument("--quick", action="store_true", help="small data, few timing runs, fewer peers: a smoke test")
    parser.add_argument("--out", type=Path, required=True, help="JSON output; the Markdown table goes beside it (.md)")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    record: dict[str, Any] = {
        "command": " ".join(["python benchmarks/run.py", *argv]),
        "quick": args.quick,
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "environment": measure.environment(),
        "threads": list(THREADS),
        "cases": [],
    }
    for name in args.cases:
        record["cases"].append(run_case(name, args.quick))
    record["seconds"] = time.perf_counter() - start
    markdown = report.render(record)
    _write_atomic(args.out, json.dumps(record, indent=2, default=float) + "\n")
    _write_atomic(args.out.with_suffix(".md"), markdown)
    print(markdown)
    log(f"wrote {args.out} and {args.out.with_suffix('.md')} in {record['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
