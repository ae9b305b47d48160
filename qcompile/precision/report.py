"""The precision section of the text report: what was promoted and why, and the Pareto front."""

from __future__ import annotations


def precision_lines(precision: dict) -> list[str]:
    if precision.get("mode") == "recipe":
        return [f"replayed recipe {precision.get('recipe')}: {precision.get('layers')} layers not int8 (no search, no calibration)"]
    chosen = precision["chosen"]
    status = "met" if precision["met"] else "NOT met"
    lines = [
        f"budget {precision['budget']}: {status} — {chosen['float_layers']} of {precision['layers']} layers kept float "
        f"(value {chosen['value']}, held-out {chosen['held_out_value']}); {precision['models_evaluated']} models evaluated "
        f"in {precision['seconds']:.1f} s" + (" (sensitivity from cache)" if precision.get("sensitivity_cached") else "")
    ]
    if precision.get("unmet"):
        lines.append(precision["unmet"])
    for layer in precision["promoted"]:
        cost = ""
        if layer.get("latency_cost_ms") is not None:
            cost = f"; costs {layer['latency_cost_ms']:.3f} ms, {layer['size_cost_bytes'] / 1024:.1f} KiB"
        lines.append(f"- {layer['op_type']} {layer['name']}: {layer['reason']}{cost}")
    lines += ["Pareto front (error vs size vs latency at 1 thread; float model "
              f"{precision['float_latency_ms']:.3f} ms, {precision['float_bytes'] / 1024:.1f} KiB):"]
    lines += ["  " + row for row in precision["pareto_table"]]
    return lines
