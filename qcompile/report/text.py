"""Plain-text rendering of a CompileReport: tables a person reads in a terminal or a CI log."""

from __future__ import annotations

from qcompile.report.model import CompileReport, group_float_nodes


def _table(headers: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return out


def _names(names: tuple[str, ...], shown: int = 3) -> str:
    text = ", ".join(n or "?" for n in names[:shown])
    return text + (f", … (+{len(names) - shown})" if len(names) > shown else "")


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def render_text(report: CompileReport) -> str:
    lines = [f"qcompile {report.qcompile_version} — {report.source}"]
    if report.output_path:
        lines.append(f"output: {report.output_path}")
    for warning in report.warnings:
        lines.append(f"WARNING: {warning}")
    lines += ["", "Passes"]
    rows = [
        [p.name, "yes" if p.modified else "no", f"{p.nodes_before}->{p.nodes_after}", f"{p.seconds * 1e3:.1f}"]
        for p in report.passes
    ]
    lines += _table(["pass", "modified", "nodes", "ms"], rows)
    pass_notes = [(p.name, n) for p in report.passes for n in p.notes]
    if pass_notes or report.notes:
        lines += ["", "Notes"]
        lines += [f"- {n}" for n in report.notes]
        lines += [f"- [{name}] {n}" for name, n in pass_notes]

    q = report.quantization
    lines += ["", "Quantization"]
    quantized = ", ".join(f"{op}×{n}" for op, n in sorted(q.quantized_ops.items())) or "nothing"
    lines.append(f"quantized nodes: {quantized}")
    lines.append(
        f"tensors: {q.activations} activations, {q.weights} weights (int8), {q.biases} biases (int32), "
        f"{q.constants} constants"
    )
    if q.float_nodes:
        lines.append("stayed float:")
        rows = [
            [g.op_type, str(len(g.nodes)), g.reason, _names(g.nodes)]
            for g in group_float_nodes([n for n in q.float_nodes if not n.shape_arithmetic])
        ]
        lines += ["  " + r for r in _table(["op", "count", "reason", "nodes"], rows)]
        integer = sum(1 for n in q.float_nodes if n.shape_arithmetic)
        if integer:
            lines.append(f"  (and {integer} nodes that compute shapes, indices or masks, not float data)")

    lines += ["", "Size"]
    lines.append(
        f"float {_size(report.float_size_bytes)} → quantized {_size(report.quantized_size_bytes)} "
        f"({report.size_ratio:.2f}x smaller)"
    )
    lines.append(f"output opset {report.opset}; domains: {', '.join(report.domains)}")

    cal = report.calibration
    lines += ["", "Calibration"]
    lines.append(f"{cal.get('source', '?')}: {cal.get('samples')} samples in {cal.get('feeds')} batches, {cal.get('seconds', 0):.2f} s")
    lines.append(f"fingerprint {cal.get('fingerprint', '')[:16]}…")

    lines += _target_lines(report.target)
    if report.fusion is not None:
        lines += ["", "Fusion"]
        lines.append(report.fusion.get("summary", ""))
    if report.precision is not None:
        from qcompile.precision.report import precision_lines

        lines += ["", "Precision"] + precision_lines(report.precision)
    lines += ["", "Verification"]
    lines += _verification_lines(report.verification)
    lines += _latency_lines(report.latency)
    lines += ["", f"compiled in {report.seconds:.2f} s"]
    return "\n".join(lines)


def render_verification(ver: dict) -> str:
    """The verification section alone (``qcompile verify``)."""
    return "\n".join(_verification_lines(ver))


def _verification_lines(ver: dict | None) -> list[str]:
    if ver is None:
        return ["not run"]
    lines = [f"{ver.get('data', '')} on {ver.get('provider', 'cpu')}: {ver.get('samples')} samples"]
    rows = [
        [o["name"], _fmt(o.get("sqnr_db")), _fmt(o.get("cosine")), _fmt(o.get("max_abs_error")), _fmt(o.get("top1_agreement"))]
        for o in ver.get("outputs", [])
    ]
    lines += _table(["output", "SQNR dB", "cosine", "max |err|", "top-1 agree"], rows)
    lines += _layers(ver)
    if ver.get("verdict"):
        lines.append(f"verdict: {ver['verdict']}")
    return lines


def _layers(ver: dict) -> list[str]:
    layers = ver.get("layers") or []
    if not layers:
        return []
    rows = [[layer["name"], _fmt(layer.get("sqnr_db")), _fmt(layer.get("cosine"))] for layer in layers]
    return ["", "per-layer SQNR (graph order)"] + _table(["tensor", "SQNR dB", "cosine"], rows)


def _target_lines(target: dict | None) -> list[str]:
    if target is None:
        return []
    lines = ["", "Target", f"{target['name']}: {target['profile']['description']}"]
    lines.append(target["note"] or f"verified on target ({target['verified_on']})")
    precision = target.get("precision")
    if precision:
        lines.append(f"nodes: {precision.get('fp16', 0)} fp16, {precision.get('fp32', 0)} fp32")
    structure = target.get("structure")
    if structure:
        lines.append(structure["summary"])
    placement = target.get("placement")
    if placement:
        cpu = ", ".join(f"{op}×{n}" for op, n in placement["cpu_nodes"].items()) or "none"
        lines.append(f"placement on {placement['provider']}: {placement['memcpy_nodes']} Memcpy nodes; on the CPU: {cpu}")
    return lines


def _latency_lines(latency: dict | None) -> list[str]:
    if latency is None:
        return []
    lines = ["", f"Latency ({latency['provider']}, {latency['threads']} thread(s), medians of interleaved runs)"]
    rows = []
    for row in latency["batches"]:
        if "skipped" in row:
            rows.append([str(row["batch"]), "-", "-", f"skipped: {row['skipped']}"])
        else:
            rows.append([str(row["batch"]), _fmt(row["float_median_ms"]), _fmt(row["compiled_median_ms"]),
                         f"{_fmt(row['speedup'])}x over {row['runs']} runs"])
    lines += _table(["batch", "float ms", "compiled ms", "speedup"], rows)
    slower = [f"batch {row['batch']} ({_fmt(row['speedup'])}x)" for row in latency["batches"]
              if row.get("speedup") is not None and row["speedup"] < 1.0]
    if slower:
        # Said in words: a ratio under 1 in a table is easy to miss, and it is the one thing a
        # quantized model must not do. On a shared machine a ratio near 1 can be noise.
        lines.append(f"WARNING: the compiled model ran slower than float at {', '.join(slower)}")
    return lines
