"""The Pareto front as a text table and an SVG scatter (written by hand: no plotting dependency)."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

from qcompile.precision.search import Point

W, H, PAD = 640, 400, 60


def front_table(points: Sequence[Point], budget: str, chosen: Point | None) -> list[str]:
    headers = ["point", "float layers", budget.split("<")[0].split(">")[0] or "value", "SQNR dB", "size KiB", "latency ms", ""]
    rows = []
    for p in points:
        rows.append([
            p.label,
            str(len(p.float_layers)),
            f"{p.value:.5g}",
            f"{p.sqnr_db:.2f}" if math.isfinite(p.sqnr_db) else "inf",
            f"{p.size_bytes / 1024:.1f}",
            "-" if p.latency_ms is None else f"{p.latency_ms:.3f}",
            ("chosen" if chosen is not None and p.float_layers == chosen.float_layers else "") + ("" if p.ok else " (misses)"),
        ])
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    out = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)), "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return out


def front_svg(points: Sequence[Point], budget: str, threshold_ok: Sequence[bool] | None = None) -> str:
    """Budget value (x) against size (y); each point labelled with its latency."""
    if not points:
        return f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}"></svg>'
    xs = [p.value for p in points]
    ys = [p.size_bytes / 1024 for p in points]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    x1 = x1 if x1 > x0 else x0 + 1e-9
    y1 = y1 if y1 > y0 else y0 + 1.0

    def sx(x: float) -> float:
        return PAD + (x - x0) / (x1 - x0) * (W - 2 * PAD)

    def sy(y: float) -> float:
        return H - PAD - (y - y0) / (y1 - y0) * (H - 2 * PAD)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="11">',
        f'<rect width="{W}" height="{H}" fill="white"/>',
        f'<line x1="{PAD}" y1="{H - PAD}" x2="{W - PAD}" y2="{H - PAD}" stroke="black"/>',
        f'<line x1="{PAD}" y1="{PAD}" x2="{PAD}" y2="{H - PAD}" stroke="black"/>',
        f'<text x="{W / 2}" y="{H - 20}" text-anchor="middle">{html.escape(budget)} value ({x0:.4g} … {x1:.4g})</text>',
        f'<text x="15" y="{H / 2}" transform="rotate(-90 15 {H / 2})" text-anchor="middle">size KiB ({y0:.0f} … {y1:.0f})</text>',
    ]
    for p in points:
        colour = "#2a7" if p.ok else "#c33"
        label = f"{len(p.float_layers)} float" + ("" if p.latency_ms is None else f", {p.latency_ms:.2f} ms")
        x, y = sx(p.value), sy(p.size_bytes / 1024)
        parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="5" fill="{colour}"><title>{html.escape(p.label)}</title></circle>')
        parts.append(f'<text x="{x + 7:.1f}" y="{y - 7:.1f}">{html.escape(label)}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def front_html(points: Sequence[Point], budget: str, chosen: Point | None, title: str) -> str:
    table = "\n".join(front_table(points, budget, chosen))
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head><body>"
        f"<h1>{html.escape(title)}</h1><p>Pareto front for budget {html.escape(budget)}: green points meet it.</p>"
        f"{front_svg(points, budget)}<pre>{html.escape(table)}</pre></body></html>\n"
    )
