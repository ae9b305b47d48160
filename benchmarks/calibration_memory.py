"""Peak memory of a compile against the number of calibration samples (issue 4's memory bound).

    python benchmarks/calibration_memory.py --out benchmarks/results/calibration_memory.json

For each histogram range method (mse, percentile, entropy) and for minmax, qcompile compiles
all-MiniLM-L6-v2 (``benchmarks.cases.minilm``'s model) on N and on 2N calibration sentences
(standard-library docstrings, batch 1, each of its own length), each compile in its own child
process (``benchmarks.measure.compile_in_child``), and reads that child's peak RSS (VmHWM at its
end: interpreter, imports, the model, the calibration stage; verification off). The bound checked:
peak RSS under 1.5 GB at N = 100 and a change under 10% from N to 2N. Prints a table, writes JSON.
A measurement, not a test: it prints whether the bound held, it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if sys.path and Path(sys.path[0]).resolve() == ROOT / "benchmarks":
    sys.path[0] = str(ROOT)
elif str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import onnx

from benchmarks import measure, text
from qcompile.graph.io import write_bytes_atomic

METHODS = ("mse", "percentile", "entropy", "minmax")
LIMIT_MIB = 1500 * 1000**2 / 1024**2  # 1.5 GB
MAX_GROWTH = 0.10


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=100, help="N: the compiles use N and 2N sentences")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    tokenizer, bert = text.load_minilm()
    sentences = text.stdlib_sentences(tokenizer, count=2 * args.samples)
    if len(sentences) < 2 * args.samples:
        sys.exit(f"only {len(sentences)} sentences in the corpus; need {2 * args.samples}")
    feeds = [text.encode(tokenizer, s) for s in sentences]
    rows = []
    with tempfile.TemporaryDirectory(prefix="qcompile-calibration-memory-") as tmp:
        work = Path(tmp)
        model_path = work / "minilm.onnx"
        onnx.save(text.export_encoder(bert, feeds[0]), model_path)
        folders = {n: measure.save_feeds(feeds[:n], work / f"calib{n}") for n in (args.samples, 2 * args.samples)}
        for method in args.methods:
            row = {"method": method}
            for n, folder in folders.items():
                out = work / f"{method}_{n}" / "model.onnx"
                out.parent.mkdir()
                result = measure.compile_in_child(
                    "qcompile", {"calibration": {"method": method}}, model_path, folder, out, timeout_s=900
                )
                if not result.ok:
                    row[f"error_{n}"] = result.error
                    continue
                row[f"rss_mib_{n}"] = round(result.peak_rss_kib / 1024, 1)
                row[f"seconds_{n}"] = round(result.seconds, 2)
            small, large = row.get(f"rss_mib_{args.samples}"), row.get(f"rss_mib_{2 * args.samples}")
            if small and large:
                row["growth"] = round(large / small - 1.0, 4)
                row["holds"] = small < LIMIT_MIB and abs(row["growth"]) < MAX_GROWTH
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    record = {
        "command": " ".join(["python", "benchmarks/calibration_memory.py", *sys.argv[1:]]),
        "samples": [args.samples, 2 * args.samples],
        "limit_mib": round(LIMIT_MIB, 1),
        "max_growth": MAX_GROWTH,
        "environment": measure.environment(),
        "date": time.strftime("%Y-%m-%d"),
        "rows": rows,
    }
    write_bytes_atomic(args.out, (json.dumps(record, indent=1) + "\n").encode())
    n, n2 = args.samples, 2 * args.samples
    print(f"| method | peak RSS MiB, {n} samples | {n2} samples | change | compile s ({n} / {n2}) | under {LIMIT_MIB:.0f} MiB and ±{MAX_GROWTH:.0%} |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['method']} | {row.get(f'rss_mib_{n}', row.get(f'error_{n}'))} | {row.get(f'rss_mib_{n2}', row.get(f'error_{n2}'))} "
            f"| {row.get('growth', 0):+.1%} | {row.get(f'seconds_{n}')} / {row.get(f'seconds_{n2}')} | {row.get('holds')} |"
        )


if __name__ == "__main__":
    main()
