"""The compile report: what each pass did, what was quantized and what stayed float and why, sizes,
calibration, and the verification verdict. Rendered as text (``render_text``) and JSON (``to_json``)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any



@dataclass
class PassRecord:
    """What one pass did, for the report."""

    name: str
    modified: bool
    seconds: float
    nodes_before: int
    nodes_after: int
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "modified": self.modified,
            "seconds": round(self.seconds, 6),
            "nodes_before": self.nodes_before,
            "nodes_after": self.nodes_after,
            "notes": list(self.notes),
        }


@dataclass(frozen=True)
class FloatNode:
    name: str
    op_type: str
    reason: str
    # The node computes shapes, indices or masks: not a candidate for quantization at all.
    shape_arithmetic: bool = False


@dataclass(frozen=True)
class FloatGroup:
    """Float nodes with the same op and reason, for a readable summary of large models."""

    op_type: str
    reason: str
    nodes: tuple[str, ...]


def group_float_nodes(nodes: list[FloatNode]) -> list[FloatGroup]:
    groups: dict[tuple[str, str], list[str]] = {}
    for node in nodes:
        groups.setdefault((node.op_type, node.reason), []).append(node.name)
    return [FloatGroup(op, reason, tuple(names)) for (op, reason), names in groups.items()]


@dataclass
class QuantizationSummary:
    quantized_ops: dict[str, int]
    float_nodes: list[FloatNode]
    activations: int
    weights: int
    biases: int
    constants: int

    def to_json(self) -> dict[str, Any]:
        return {
            "quantized_ops": dict(sorted(self.quantized_ops.items())),
            "float_nodes": [vars(n) for n in self.float_nodes],
            "tensors": {
                "activations": self.activations,
                "weights": self.weights,
                "biases": self.biases,
                "constants": self.constants,
            },
        }


@dataclass
class CompileReport:
    qcompile_version: str
    source: str
    options: dict[str, Any]
    passes: list[PassRecord]
    quantization: QuantizationSummary
    float_size_bytes: int
    quantized_size_bytes: int
    opset: int
    domains: list[str]
    output_ops: dict[str, int]
    calibration: dict[str, Any]
    verification: dict[str, Any] | None
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    fusion: dict[str, Any] | None = None
    # The target profile, where it was verified (and "not verified on target" with why), its
    # structure check (tensorrt) and precision counts (fp16).
    target: dict[str, Any] | None = None
    # Float vs compiled latency on the verification provider (``verify/latency.py report_latency``).
    latency: dict[str, Any] | None = None
    output_path: str | None = None
    seconds: float = 0.0
    # The precision search or recipe replay (qcompile.precision), when one ran.
    precision: dict[str, Any] | None = None

    @property
    def size_ratio(self) -> float:
        return self.float_size_bytes / max(self.quantized_size_bytes, 1)

    def to_json(self) -> dict[str, Any]:
        return {
            "qcompile_version": self.qcompile_version,
            "source": self.source,
            "output_path": self.output_path,
            "options": self.options,
            "warnings": list(self.warnings),
            "notes": list(self.notes),
            "passes": [p.to_json() for p in self.passes],
            "quantization": self.quantization.to_json(),
            "size": {
                "float_bytes": self.float_size_bytes,
                "quantized_bytes": self.quantized_size_bytes,
                "ratio": round(self.size_ratio, 3),
            },
            "output_model": {"opset": self.opset, "domains": self.domains, "ops": dict(sorted(self.output_ops.items()))},
            "calibration": self.calibration,
            "target": self.target,
            "fusion": self.fusion,
            "verification": self.verification,
            "latency": self.latency,
            "seconds": round(self.seconds, 3),
            **({"precision": self.precision} if self.precision is not None else {}),
        }

    def to_json_text(self) -> str:
        return json.dumps(self.to_json(), indent=2, allow_nan=False)

    def render_text(self) -> str:
        from qcompile.report.text import render_text

        return render_text(self)
