"""The mixed-precision search on three suite models, against their float and all-int8 compiles.

    PYTHONPATH=. python benchmarks/mixed_precision.py --out /tmp/mixed_precision.json [--cases minilm,...]

Budgets (issue 6):
- minilm: mean cosine of the sentence embeddings (mean pooling; batch 1, no padding) >= 0.999,
  given to the API as a callable; targets: faster than float at 1 thread, under half the float size;
- digits_cnn: ``top1-drop<=0.5`` (points of top-1 disagreement with float); target: <= 10% of the
  Conv/Gemm/MatMul layers promoted;
- resnet18: ``sqnr>=S+6`` with S its all-int8 logits SQNR on the evaluation images; target <= 10%
  promoted, or the Pareto front and best point.

Search time is the whole compile with the search (calibration, sensitivity, cost, search, Pareto
latency, final build, verification). Every row's metrics are on the case's evaluation data, which
the search never sees. Latency: float, all-int8 and mixed timed interleaved at 1 thread. Prints a
table and writes JSON. A measurement, not a test: nothing asserts a number.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.cases import CASES, Case  # noqa: E402

import qcompile  # noqa: E402
from qcompile.options import CompileOptions, PrecisionOptions  # noqa: E402
from qcompile.precision.policy import SEARCHED_OPS  # noqa: E402
from qcompile.verify.latency import measure_latency  # noqa: E402
from qcompile.verify.sessions import make_session  # noqa: E402


def pooled_cosine_budget(threshold: float):
    def sentence_cosine(reference, test):
        values = []
        for ref, out in zip(reference, test):
            a, b = ref[0].mean(axis=1), out[0].mean(axis=1)  # no padding: mean pooling over all tokens
            values += list((a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)))
        value = float(np.mean(values))
        return value, value >= threshold

    sentence_cosine.__name__ = f"sentence-cosine>={threshold}"
    return sentence_cosine


def outputs(model, feeds):
    session = make_session(model, intra_op_threads=2)
    return [session.run(None, feed) for feed in feeds]


def searchable(model) -> int:
    return sum(1 for n in model.graph.node if n.op_type in SEARCHED_OPS)


def run_case(case: Case) -> dict:
    options = CompileOptions(show_progress=False)
    plain = qcompile.compile_model(case.model, case.calibration, options, verify_data=case.evaluation)
    reference = outputs(case.model, case.evaluation)
    int8_metrics = case.metric(reference, outputs(plain.model, case.evaluation))

    if case.name == "minilm":
        budget, target = pooled_cosine_budget(0.999), "faster than float at 1 thread and < half the float size"
    elif case.name == "digits_cnn":
        budget, target = "top1-drop<=0.5", "<= 10% of Conv/Gemm/MatMul promoted"
    else:
        budget = f"sqnr>={int8_metrics['sqnr_db'] + 6:.2f}"
        target = "<= 10% promoted, or the Pareto front and best point"

    start = time.perf_counter()
    mixed = qcompile.compile_model(
        case.model, case.calibration, CompileOptions(show_progress=False, precision=PrecisionOptions()),
        verify_data=case.evaluation, budget=budget,
    )
    seconds = time.perf_counter() - start
    precision = mixed.report.precision
    mixed_metrics = case.metric(reference, outputs(mixed.model, case.evaluation))
    latency = measure_latency({"float": case.model, "int8": plain.model, "mixed": mixed.model}, case.latency_feed, threads=1, runs=30)
    layers = precision["layers"]
    promoted = len(precision["promoted"])
    sizes = {"float": case.model.ByteSize(), "int8": plain.model.ByteSize(), "mixed": mixed.model.ByteSize()}
    ms = {k: round(v.median_ms, 4) for k, v in latency.items()}
    if case.name == "minilm":
        holds = precision["met"] and ms["mixed"] < ms["float"] and sizes["mixed"] < sizes["float"] / 2
    else:
        holds = precision["met"] and promoted <= 0.1 * layers
    return {
        "case": case.name,
        "budget": precision["budget"],
        "target": target,
        "met": precision["met"],
        "target_holds": holds,
        "unmet": precision["unmet"],
        "search_seconds": round(seconds, 2),
        "search_timings": precision["timings"],
        "layers": layers,
        "promoted": promoted,
        "promoted_fraction": round(promoted / max(layers, 1), 4),
        "promoted_layers": precision["promoted"],
        "sizes_bytes": sizes,
        "latency_ms_1t": ms,
        "int8_metrics": int8_metrics,
        "mixed_metrics": mixed_metrics,
        "chosen": precision["chosen"],
        "pareto_front": precision["pareto_front"],
        "pareto_table": precision["pareto_table"],
        "sensitivity_top": precision["sensitivity"],
    }


def _row(r: dict) -> list[str]:
    key = {"minilm": "mean_cosine", "digits_cnn": "accuracy", "resnet18": "sqnr_db"}.get(r["case"], "sqnr_db")
    return [
        r["case"], r["budget"], "yes" if r["met"] else "NO", f"{r['promoted']}/{r['layers']}",
        f"{r['int8_metrics'].get(key, float('nan')):.4f}", f"{r['mixed_metrics'].get(key, float('nan')):.4f}",
        f"{r['sizes_bytes']['float'] / 2**20:.2f}/{r['sizes_bytes']['int8'] / 2**20:.2f}/{r['sizes_bytes']['mixed'] / 2**20:.2f}",
        f"{r['latency_ms_1t']['float']:.2f}/{r['latency_ms_1t']['int8']:.2f}/{r['latency_ms_1t']['mixed']:.2f}",
        f"{r['search_seconds']:.1f}", "yes" if r["target_holds"] else "no",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON results path (use /tmp while developing)")
    parser.add_argument("--cases", default="minilm,digits_cnn,resnet18")
    parser.add_argument("--quick", action="store_true", help="smaller data (smoke test)")
    args = parser.parse_args(argv)
    results = []
    for name in args.cases.split(","):
        case = CASES[name](args.quick)
        print(f"[{name}] searching…", file=sys.stderr, flush=True)
        results.append(run_case(case))
    headers = ["case", "budget", "met", "promoted", "int8 metric", "mixed metric", "MiB float/int8/mixed",
               "1T ms float/int8/mixed", "search s", "target holds"]
    rows = [_row(r) for r in results]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    for r in results:
        print(f"\n{r['case']} ({r['budget']}): {r['unmet'] or 'met'}")
        print("\n".join(r["pareto_table"]))
    args.out.write_text(json.dumps({"results": results}, indent=1, default=float) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
