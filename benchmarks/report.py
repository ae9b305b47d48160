"""The Markdown table of a benchmark run, and where qcompile's default loses to a peer.

One table per case (their metrics differ); the header gives the command, the machine and the
versions. Columns: file size and how many times smaller than float; median latency at batch 1 with
1 and 2 intra-op threads and the speedup over float from the same interleaved loop; the case's
metric and the output SQNR against float; compile time (in the child, without interpreter start
and imports) and peak RSS of the compiling process.
"""

from __future__ import annotations

from typing import Any

MIB = 2**20

# Metric columns: header, format, whether higher is better.
METRICS = {
    "accuracy": ("accuracy", "{:.2%}"),
    "top1_agreement": ("top-1 agree", "{:.2%}"),
    "mean_cosine": ("mean cos", "{:.4f}"),
    "min_cosine": ("min cos", "{:.4f}"),
    "spearman": ("Spearman", "{:.4f}"),
    "sqnr_db": ("SQNR dB", "{:.1f}"),
}


def render(record: dict[str, Any]) -> str:
    env = record["environment"]
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
    lines = [
        f"# qcompile benchmark{' (quick)' if record['quick'] else ''}",
        "",
        f"Command: `{record['command']}` — {record['seconds']:.0f} s wall in all.",
        f"Machine: {env['cpu']}, {env['cpu_count']} cores, {env['memory_gib']} GiB; {env['platform']}; Python {env['python']}.",
        f"Versions: {versions}; qcompile commit {env.get('qcompile_commit') or 'unknown'}.",
        "",
        (
            "Latency: onnxruntime CPU provider, batch 1, median of interleaved runs after warm-up, spinning off, "
            "inter-op 1 thread; speedup = float median / median, same loop. Compile s: in a child process, "
            "from loading the model to the written output (interpreter start and imports excluded); peak RSS: "
            "that child's VmHWM (interpreter, imports, model, calibration data)."
        ),
    ]
    for case in record["cases"]:
        lines += ["", f"## {case['name']}", ""]
        if "skipped" in case:
            lines.append(f"Skipped: {case['skipped']}")
            continue
        lines += [case["description"] + ".", ""]
        lines += [f"- {k}: {v}" for k, v in case["data"].items()]
        lines += ["", *table(case), ""]
        losses = qcompile_losses(case)
        if losses:
            lines.append("Where qcompile (default) loses to a peer:")
            lines += [f"- {loss}" for loss in losses]
        else:
            lines.append("qcompile (default) loses to no peer on any column.")
    return "\n".join(lines) + "\n"


def table(case: dict[str, Any]) -> list[str]:
    metric_keys = [*case["columns"], "sqnr_db"]
    header = ["config", "size MiB", "smaller", "1T ms", "1T speedup", "2T ms", "2T speedup",
              *[METRICS[k][0] for k in metric_keys], "compile s", "peak RSS MiB", "notes"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in case["rows"]:
        cells = [row["config"]]
        if row["status"] != "ok":
            cells += ["-"] * (len(header) - 2) + [_short(f"{row['status']}: {row.get('error') or ''}")]
            lines.append("| " + " | ".join(cells) + " |")
            continue
        cells += [f"{row['size_bytes'] / MIB:.2f}", f"{row['size_ratio']:.2f}x"]
        for threads in ("1", "2"):
            lat = row["latency"].get(threads)
            cells += [f"{lat['median_ms']:.3g}", f"{lat['speedup']:.2f}x"] if lat else ["-", "-"]
        for key in metric_keys:
            value = row["metrics"].get(key)
            cells.append("-" if value is None else METRICS[key][1].format(value))
        comp = row.get("compile")
        cells += [f"{comp['seconds']:.2f}", _mib(comp["peak_rss_kib"])] if comp else ["-", "-"]
        cells.append(_short("; ".join(row.get("notes", ()))))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def qcompile_losses(case: dict[str, Any]) -> list[str]:
    """Each column on which some peer that ran beats qcompile's default configuration, with both values."""
    rows = {r["config"]: r for r in case["rows"]}
    ours = rows.get("qcompile")
    if ours is None or ours["status"] != "ok":
        return ["qcompile's default configuration did not produce a model" if ours else "no qcompile row"]
    peers = [r for r in case["rows"] if r["status"] == "ok" and r["tool"] not in ("float", "qcompile")]

    def value(row: dict[str, Any], column: str) -> float | None:
        if column == "size MiB":
            return row["size_bytes"] / MIB
        if column in ("1T ms", "2T ms"):
            lat = row["latency"].get(column[0])
            return lat["median_ms"] if lat else None
        if column == "compile s":
            return row["compile"]["seconds"]
        if column == "peak RSS MiB":
            kib = row["compile"]["peak_rss_kib"]
            return kib / 1024 if kib else None
        return row["metrics"].get(column)

    losses = []
    lower_better = ["size MiB", "1T ms", "2T ms", "compile s", "peak RSS MiB"]
    for column in lower_better + [*case["columns"], "sqnr_db"]:
        ours_v = value(ours, column)
        scored = [(value(p, column), p["config"]) for p in peers if value(p, column) is not None]
        if ours_v is None or not scored:
            continue
        better = min(scored) if column in lower_better else max(scored)
        if (better[0] < ours_v) if column in lower_better else (better[0] > ours_v):
            name = METRICS[column][0] if column in METRICS else column
            margin = abs(better[0] - ours_v) / abs(ours_v) if ours_v else float("inf")
            losses.append(f"{name}: {better[1]} {_fmt(better[0])} vs qcompile {_fmt(ours_v)} ({margin:.1%} better)")
    return losses


def _mib(kib: int | None) -> str:
    return "-" if kib is None else f"{kib / 1024:.0f}"


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def _short(text: str, limit: int = 140) -> str:
    text = text.replace("|", "/").replace("\n", " ")
    return text if len(text) <= limit else text[: limit - 1] + "…"
