"""The accuracy budget a mixed-precision model must meet.

A budget turns the float model's outputs and a candidate's outputs on the same feeds (one list of
output arrays per feed) into ``(value, ok)``. From text (``--budget``):

- ``cosine>=T``: the mean over samples (rows of every feed) of the cosine between the float and
  quantized values of each sample, the lowest over the model's outputs;
- ``sqnr>=T``: the SQNR in dB of each output over all feeds, the lowest over the outputs;
- ``top1-drop<=P``: 100 × the fraction of samples whose argmax (first output, shaped
  (batch, classes)) differs from the float model's. Without labels this is the most the accuracy
  can drop, in points: a conservative stand-in for the accuracy drop.

From the API: ``Budget.from_callable(fn, name)`` with ``fn(float_outputs, quantized_outputs) ->
(value, ok)`` — for example a task accuracy computed from the outputs.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from qcompile.errors import UsageError
from qcompile.verify.metrics import OutputComparison

Outputs = Sequence[Sequence[np.ndarray]]
BudgetFn = Callable[[Outputs, Outputs], "tuple[float, bool]"]

_PATTERN = re.compile(r"^\s*([a-z0-9_-]+)\s*(>=|<=)\s*([-+0-9.eE]+)\s*$")
# metric -> (comparison it takes, whether higher is better)
_METRICS = {"cosine": ">=", "sqnr": ">=", "top1-drop": "<="}


@dataclass(frozen=True)
class Budget:
    text: str  # how it is shown in reports: "cosine>=0.999", or the callable's name
    fn: BudgetFn
    higher_is_better: bool = True

    def evaluate(self, reference: Outputs, test: Outputs) -> tuple[float, bool]:
        value, ok = self.fn(reference, test)
        return float(value), bool(ok)

    @staticmethod
    def from_callable(fn: BudgetFn, name: str | None = None, *, higher_is_better: bool = True) -> Budget:
        return Budget(name or getattr(fn, "__name__", "custom budget"), fn, higher_is_better)


def parse_budget(text: str) -> Budget:
    """A budget from ``METRIC>=T`` / ``METRIC<=T`` text; one-line UsageError when malformed."""
    match = _PATTERN.match(text or "")
    if match is None:
        raise UsageError(f"--budget expects METRIC>=VALUE or METRIC<=VALUE (e.g. 'cosine>=0.999'), got {text!r}")
    metric, op, number = match.groups()
    if metric not in _METRICS:
        raise UsageError(f"--budget {text!r}: metric must be one of {', '.join(_METRICS)}, got {metric!r}")
    if op != _METRICS[metric]:
        raise UsageError(f"--budget {text!r}: {metric} takes {_METRICS[metric]} (got {op})")
    try:
        threshold = float(number)
    except ValueError:
        raise UsageError(f"--budget {text!r}: {number!r} is not a number") from None
    if not math.isfinite(threshold):
        raise UsageError(f"--budget {text!r}: the threshold must be finite")
    if metric == "cosine" and not -1.0 <= threshold <= 1.0:
        raise UsageError(f"--budget {text!r}: a cosine is in [-1, 1]")
    if metric == "top1-drop" and not 0.0 <= threshold <= 100.0:
        raise UsageError(f"--budget {text!r}: top1-drop is in points, in [0, 100]")
    value_of = {"cosine": mean_sample_cosine, "sqnr": min_sqnr_db, "top1-drop": top1_drop_points}[metric]
    higher = op == ">="

    def fn(reference: Outputs, test: Outputs) -> tuple[float, bool]:
        value = value_of(reference, test)
        return value, (value >= threshold if higher else value <= threshold)

    return Budget(f"{metric}{op}{number}", fn, higher_is_better=op == ">=")


def _comparisons(reference: Outputs, test: Outputs) -> list[OutputComparison]:
    comparisons = [OutputComparison(f"output {i}") for i in range(len(reference[0]))] if reference else []
    for ref_outputs, test_outputs in zip(reference, test):
        for comparison, ref, out in zip(comparisons, ref_outputs, test_outputs):
            comparison.update(ref, out)
    return comparisons


def min_sqnr_db(reference: Outputs, test: Outputs) -> float:
    """The lowest output SQNR in dB over all feeds (+inf when identical)."""
    return min(c.result().sqnr_db for c in _comparisons(reference, test))


def mean_sample_cosine(reference: Outputs, test: Outputs) -> float:
    """The lowest over outputs of the mean per-sample cosine (whole-output cosine for rank < 2)."""
    values = []
    for comparison in _comparisons(reference, test):
        result = comparison.result()
        values.append(result.mean_sample_cosine if result.mean_sample_cosine is not None else result.cosine)
    return min(values)


def top1_drop_points(reference: Outputs, test: Outputs) -> float:
    """100 × the fraction of samples whose first output's argmax moved."""
    agree = total = 0
    for ref_outputs, test_outputs in zip(reference, test):
        ref, out = np.asarray(ref_outputs[0]), np.asarray(test_outputs[0])
        if ref.ndim != 2:
            raise UsageError(f"top1-drop needs a (batch, classes) first output; this model's is shaped {ref.shape}")
        agree += int(np.count_nonzero(np.argmax(ref, axis=1) == np.argmax(out, axis=1)))
        total += ref.shape[0]
    return 100.0 * (1.0 - agree / total) if total else 0.0


def sample_errors(reference: Outputs, test: Outputs) -> list[float]:
    """Per-feed-row error (1 - cosine of the sample, the worst output): what ranks samples."""
    errors: list[float] = []
    for ref_outputs, test_outputs in zip(reference, test):
        rows = None
        for ref, out in zip(ref_outputs, test_outputs):
            ref = np.asarray(ref, dtype=np.float64)
            out = np.asarray(out, dtype=np.float64)
            n = ref.shape[0] if ref.ndim >= 1 else 1
            r, t = ref.reshape(n, -1), out.reshape(n, -1)
            denom = np.sqrt((r * r).sum(1) * (t * t).sum(1))
            with np.errstate(divide="ignore", invalid="ignore"):
                cos = np.where(denom > 0, (r * t).sum(1) / denom, 1.0)
            err = np.nan_to_num(1.0 - cos, nan=2.0)
            rows = err if rows is None else np.maximum(rows, err)
        errors += list(rows) if rows is not None else []
    return [float(e) for e in errors]
