"""How close a test output is to its reference, accumulated batch by batch.

All sums are float64 and only sums are kept, so a comparison over many batches holds no outputs.
With ``r`` the reference (float model) and ``t`` the test (quantized model) values:

- SQNR (dB)         = 10 · log10( Σ r² / Σ (r - t)² )
                      (+inf when identical, -inf when Σ r² = 0 and the noise is not)
- cosine            = Σ r·t / ( sqrt(Σ r²) · sqrt(Σ t²) )    over all elements of all batches
- mean_sample_cosine = mean over samples (axis 0) of the cosine of each sample's values
- top1_agreement    = fraction of samples whose argmax agree, for outputs shaped (batch, classes)

A cosine whose norms are zero is 1.0 when both vectors are zero and 0.0 when only one is.

NaN or infinite values do not crash a comparison: pairs where either side is not finite are left
out of every sum, counted in ``nonfinite``, and the SQNR is then reported as -inf (a failure) with a
``note`` saying how many values were affected.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from qcompile.errors import InvalidModelError


def json_float(value: float | None) -> float | None:
    """A float JSON can carry: +inf, -inf and NaN become null (the ``note`` says which case it was)."""
    if value is None or not math.isfinite(value):
        return None
    return float(value)


@dataclass(frozen=True)
class OutputMetrics:
    name: str
    sqnr_db: float
    cosine: float
    # None for outputs without a batch axis and more than one value per sample (rank < 2).
    mean_sample_cosine: float | None
    max_abs_error: float
    mean_abs_error: float
    # Only for classifier-like outputs: rank 2 (batch, classes) with classes > 1.
    top1_agreement: float | None
    samples: int
    elements: int
    # Positions where the reference or the test value is NaN or infinite.
    nonfinite: int = 0
    note: str | None = None

    def to_json(self) -> dict[str, Any]:
        """JSON-ready dict. An infinite SQNR is written as null: +inf for identical outputs (the note
        says "identical"), -inf for non-finite values (the note gives the count)."""
        return {
            "name": self.name,
            "sqnr_db": json_float(self.sqnr_db),
            "cosine": json_float(self.cosine),
            "mean_sample_cosine": json_float(self.mean_sample_cosine),
            "max_abs_error": json_float(self.max_abs_error),
            "mean_abs_error": json_float(self.mean_abs_error),
            "top1_agreement": json_float(self.top1_agreement),
            "samples": self.samples,
            "elements": self.elements,
            "nonfinite": self.nonfinite,
            "note": self.note,
        }


class OutputComparison:
    """Streams (reference, test) pairs of one output into float64 sums; ``result()`` gives metrics."""

    def __init__(self, name: str = "output") -> None:
        self.name = name
        self._updates = 0
        self._samples = 0
        self._elements = 0  # finite pairs only
        self._nonfinite_ref = 0
        self._nonfinite_test = 0
        self._nonfinite = 0
        self._sum_ref2 = 0.0
        self._sum_test2 = 0.0
        self._sum_ref_test = 0.0
        self._sum_err2 = 0.0
        self._sum_abs_err = 0.0
        self._max_abs_err = 0.0
        self._sample_cosine_sum = 0.0
        self._sample_cosine_count = 0
        self._top1_agree = 0
        self._top1_total = 0
        self._classifier = True

    def update(self, ref: np.ndarray, test: np.ndarray) -> None:
        ref = np.asarray(ref)
        test = np.asarray(test)
        if ref.shape != test.shape:
            raise InvalidModelError(
                f"output {self.name!r} has shape {ref.shape} in the reference model "
                f"and {test.shape} in the test model"
            )
        ref64 = ref.astype(np.float64, copy=False)
        test64 = test.astype(np.float64, copy=False)
        finite = np.isfinite(ref64) & np.isfinite(test64)
        self._nonfinite_ref += int(np.count_nonzero(~np.isfinite(ref64)))
        self._nonfinite_test += int(np.count_nonzero(~np.isfinite(test64)))
        self._nonfinite += int(finite.size - np.count_nonzero(finite))
        # Zero out the non-finite pairs so that they add nothing to any sum.
        r = np.where(finite, ref64, 0.0)
        t = np.where(finite, test64, 0.0)
        err = np.abs(r - t)

        self._updates += 1
        self._samples += ref.shape[0] if ref.ndim >= 1 else 1
        self._elements += int(np.count_nonzero(finite))
        self._sum_ref2 += float(np.sum(r * r))
        self._sum_test2 += float(np.sum(t * t))
        self._sum_ref_test += float(np.sum(r * t))
        self._sum_err2 += float(np.sum(err * err))
        self._sum_abs_err += float(np.sum(err))
        if err.size:
            self._max_abs_err = max(self._max_abs_err, float(np.max(err)))

        if ref.ndim >= 2 and ref.shape[0] > 0:
            rows_r = r.reshape(ref.shape[0], -1)
            rows_t = t.reshape(ref.shape[0], -1)
            dots = np.sum(rows_r * rows_t, axis=1)
            norms_r = np.sum(rows_r * rows_r, axis=1)
            norms_t = np.sum(rows_t * rows_t, axis=1)
            self._sample_cosine_sum += float(np.sum(_cosines(dots, norms_r, norms_t)))
            self._sample_cosine_count += ref.shape[0]

        self._classifier = self._classifier and ref.ndim == 2 and ref.shape[1] > 1
        if self._classifier and ref.shape[0] > 0:
            agree = np.argmax(ref64, axis=1) == np.argmax(test64, axis=1)
            # A sample with a non-finite value never agrees (argmax of NaN is meaningless).
            agree &= np.all(finite, axis=1)
            self._top1_agree += int(np.count_nonzero(agree))
            self._top1_total += ref.shape[0]

    def result(self) -> OutputMetrics:
        if not self._updates:
            raise InvalidModelError(f"output {self.name!r}: no values were compared")
        note = None
        if self._nonfinite:
            sqnr = -math.inf
            note = (
                f"{self._nonfinite_test} test and {self._nonfinite_ref} reference values are NaN or "
                "infinite; "
                f"SQNR set to -inf, other metrics over the {self._elements} finite pairs"
            )
        else:
            sqnr = sqnr_from_sums(self._sum_ref2, self._sum_err2)
            if self._sum_err2 == 0.0:
                note = "identical outputs (SQNR infinite)"
        return OutputMetrics(
            name=self.name,
            sqnr_db=sqnr,
            cosine=_cosine(self._sum_ref_test, self._sum_ref2, self._sum_test2),
            mean_sample_cosine=(
                self._sample_cosine_sum / self._sample_cosine_count if self._sample_cosine_count else None
            ),
            max_abs_error=self._max_abs_err,
            mean_abs_error=self._sum_abs_err / self._elements if self._elements else 0.0,
            top1_agreement=(
                self._top1_agree / self._top1_total if self._classifier and self._top1_total else None
            ),
            samples=self._samples,
            elements=self._elements,
            nonfinite=self._nonfinite,
            note=note,
        )


def compare_arrays(ref: np.ndarray, test: np.ndarray, name: str = "output") -> OutputMetrics:
    """The metrics of one (reference, test) pair: ``OutputComparison`` over a single batch."""
    comparison = OutputComparison(name)
    comparison.update(ref, test)
    return comparison.result()


def sqnr_from_sums(signal: float, noise: float) -> float:
    """10·log10(signal / noise) in dB, with noise 0 → +inf and signal 0 (noise > 0) → -inf."""
    if noise == 0.0:
        return math.inf
    if signal == 0.0:
        return -math.inf
    return 10.0 * math.log10(signal / noise)


def _cosine(dot: float, norm2_a: float, norm2_b: float) -> float:
    return float(_cosines(np.array([dot]), np.array([norm2_a]), np.array([norm2_b]))[0])


def _cosines(dots: np.ndarray, norm2_a: np.ndarray, norm2_b: np.ndarray) -> np.ndarray:
    """Elementwise cosine from dot products and squared norms, with the zero-norm rule above."""
    denom = np.sqrt(norm2_a) * np.sqrt(norm2_b)
    with np.errstate(divide="ignore", invalid="ignore"):
        # Rounding can put |cos| a hair above 1; clip it back into [-1, 1].
        cos = np.clip(dots / denom, -1.0, 1.0)
    both_zero = (norm2_a == 0.0) & (norm2_b == 0.0)
    return np.where(both_zero, 1.0, np.where(denom == 0.0, 0.0, cos))
