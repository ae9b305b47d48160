"""The per-layer precision policy, resolved in one place.

A node's precision is decided, first match wins:

1. an explicit override naming the node exactly (``--keep-float NAME``, ``--precision NAME=fp32``);
2. an override whose fnmatch pattern matches the node's name;
3. an override naming the node's op type;
4. the automatic assignment (the precision search);
5. the global default, int8.

``--keep-float X`` is ``--precision X=fp32``. Which precisions are offered comes from the target
(``candidates``); a precision the target cannot run well is refused with the reason.
"""

from __future__ import annotations

import enum
import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import onnx_ir as ir

from qcompile.errors import UsageError


class Precision(str, enum.Enum):
    FP32 = "fp32"
    INT8 = "int8"
    INT4 = "int4"  # blockwise int4 weights, float activations (MatMul only)
    FP16 = "fp16"
    INT16 = "int16"


DEFAULT = Precision.INT8
# The layers the search may promote: the ones whose int8 kernels carry the model's work.
SEARCHED_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")

# Why a precision is refused on onnxruntime's CPU provider.
_CPU_REFUSALS = {
    Precision.INT16: (
        "onnxruntime's CPU provider has no int16 kernels: 16-bit QDQ runs as dequantize -> float op -> "
        "quantize, slower than fp32 (measured 1.41 ms vs 0.96 ms fp32 for a 64-channel 3x3 Conv)"
    ),
    Precision.FP16: (
        "onnxruntime's CPU provider runs most fp16 ops by casting to float32 and back, slower than fp32; "
        "fp16 is for GPU targets"
    ),
}


def candidates(target: str = "cpu", op_type: str | None = None) -> tuple[Precision, ...]:
    """The precisions ``target`` offers for a node of ``op_type`` (None: any op).

    The CPU target (onnxruntime's CPU provider) offers int8 and fp32, and int4 weights for MatMul
    (MatMulNBits). Another target supplies its own list here.
    """
    if target != "cpu":
        raise UsageError(f"unknown precision target {target!r}; this build knows only 'cpu'")
    if op_type is None or op_type == "MatMul":
        return (Precision.INT8, Precision.FP32, Precision.INT4)
    return (Precision.INT8, Precision.FP32)


def check_offered(precision: Precision, target: str = "cpu") -> None:
    """Refuse a precision the target does not offer at all, saying why (UsageError)."""
    if precision in candidates(target):
        return
    why = _CPU_REFUSALS.get(precision, "not offered") if target == "cpu" else "not offered"
    raise UsageError(f"--precision {precision.value} is not available on the {target} target: {why}")


@dataclass(frozen=True)
class PrecisionRule:
    pattern: str  # a node name, an fnmatch pattern over names, or an op type
    precision: Precision
    source: str  # "--precision" or "--keep-float", for the reason the report prints

    @property
    def text(self) -> str:
        return f"{self.pattern}={self.precision.value}"


def parse_rule(text: str, target: str = "cpu") -> PrecisionRule:
    """``PATTERN=PRECISION`` (``--precision``), refused in one line when malformed or not offered."""
    if not isinstance(text, str) or text.count("=") < 1:
        raise UsageError(f"--precision expects PATTERN=PRECISION (e.g. '/head/*=fp32'), got {text!r}")
    pattern, _, value = text.rpartition("=")
    pattern, value = pattern.strip(), value.strip().lower()
    if not pattern:
        raise UsageError(f"--precision {text!r} has no pattern before '='")
    try:
        precision = Precision(value)
    except ValueError:
        allowed = "|".join(p.value for p in Precision)
        raise UsageError(f"--precision {text!r}: precision must be one of {allowed}, got {value!r}") from None
    check_offered(precision, target)
    return PrecisionRule(pattern, precision, "--precision")


def rules_from_options(keep_float: Iterable[str], precision: Iterable[str], target: str = "cpu") -> tuple[PrecisionRule, ...]:
    rules = [PrecisionRule(p, Precision.FP32, "--keep-float") for p in keep_float]
    return tuple(rules + [parse_rule(text, target) for text in precision])


@dataclass(frozen=True)
class Assignment:
    """A node's resolved precision and, in words, where it came from."""

    precision: Precision
    reason: str  # empty for the default


@dataclass(frozen=True)
class PrecisionPolicy:
    rules: tuple[PrecisionRule, ...] = ()
    # The automatic assignment: node name -> (precision, reason), from the search or a recipe.
    auto: Mapping[str, Assignment] = field(default_factory=dict)
    default: Precision = DEFAULT
    target: str = "cpu"

    def with_auto(self, auto: Mapping[str, Assignment]) -> PrecisionPolicy:
        return PrecisionPolicy(self.rules, dict(auto), self.default, self.target)

    def explicit(self, node: ir.Node) -> Assignment | None:
        """The user's override for ``node``: by exact name, then pattern, then op type."""
        name = node.name or ""
        tiers = (
            lambda r: r.pattern == name,
            lambda r: bool(name) and fnmatch.fnmatchcase(name, r.pattern),
            lambda r: r.pattern == node.op_type,
        )
        for matches in tiers:
            for rule in self.rules:
                if matches(rule):
                    shown = rule.pattern if rule.source == "--keep-float" else rule.text
                    return Assignment(rule.precision, f"by {rule.source} {shown!r}")
        return None

    def resolve(self, node: ir.Node) -> Assignment:
        found = self.explicit(node)
        if found is not None:
            return found
        if node.name in self.auto:
            return self.auto[node.name]
        return Assignment(self.default, "")

    def resolve_graph(self, graph: ir.Graph) -> dict[str, Assignment]:
        """Every named node's assignment; int4 refused on anything but a MatMul with a constant weight."""
        out = {}
        for node in graph:
            assignment = self.resolve(node)
            if assignment.precision == Precision.INT4 and not _int4_capable(node):
                if any(rule.pattern == node.name for rule in self.rules):
                    raise UsageError(
                        f"node {node.name!r} ({node.op_type}) cannot take int4 weights: int4 is for MatMul with a 2-D constant weight"
                    )
                # A pattern or op type that also matched other nodes: those keep the default.
                assignment = Assignment(self.default, "")
            if assignment.precision in (Precision.FP16, Precision.INT16):
                check_offered(assignment.precision, self.target)
            out[node.name] = assignment
        return out

    def float_reasons(self, graph: ir.Graph) -> dict[str, str]:
        """Node name -> why it stays float in annotation (fp32, and int4: its weights go int4 later)."""
        reasons = {}
        for name, assignment in self.resolve_graph(graph).items():
            if assignment.precision == Precision.FP32:
                reason = assignment.reason
                reasons[name] = reason if reason.startswith("kept float") else f"kept float {reason}".strip()
            elif assignment.precision == Precision.INT4:
                reasons[name] = f"int4 weights {assignment.reason}".strip()
        return reasons

    def int4_nodes(self, graph: ir.Graph) -> tuple[str, ...]:
        return tuple(name for name, a in self.resolve_graph(graph).items() if a.precision == Precision.INT4)


def _int4_capable(node: ir.Node) -> bool:
    if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.inputs) < 2:
        return False
    weight = node.inputs[1]
    return weight is not None and weight.const_value is not None and len(weight.shape or ()) == 2
