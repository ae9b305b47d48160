"""Per-channel activation statistics for SmoothQuant: max |x_k| and a bounded sample of rows.

A tensor's last axis holds its channels (the K of ``x @ W``); every other axis indexes rows. The
``ChannelStatsObserver`` keeps, over every batch it is shown, the exact max |x_k| of each channel
and a uniform sample of at most ``rows`` rows (reservoir sampling, Vitter's algorithm R, seeded):
memory is O(rows × channels) whatever the number of calibration samples.

``collect_channel_stats`` runs one pass over the calibration feeds with onnxruntime, through the
same observation model (``graph/observation``) and streaming loop (``calibration/collect``) as
calibration, exposing only the named tensors.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from qcompile.calibration.collect import calibrate
from qcompile.errors import InvalidDataError
from qcompile.graph.observation import observation_model, observed_name


@dataclass(frozen=True)
class ChannelStats:
    absmax: np.ndarray  # (K,) float64: max |x_k| over every row seen
    rows: np.ndarray  # (n, K) float32, n <= the bound: a uniform sample of the rows seen
    seen: int  # rows seen


class ChannelStatsObserver:
    """Streams batches of one tensor; ``update(array)`` then ``result()``."""

    def __init__(self, rows: int, seed: int = 0, name: str = "") -> None:
        self.name = name
        self._bound = rows
        self._rng = np.random.default_rng(seed)
        self._absmax: np.ndarray | None = None
        self._sample: np.ndarray | None = None
        self._seen = 0

    def update(self, array: np.ndarray) -> None:
        array = np.asarray(array, dtype=np.float32)
        if array.size == 0:
            return
        batch = array.reshape(-1, array.shape[-1])
        if not np.isfinite(batch).all():
            raise InvalidDataError(f"tensor {self.name!r} contains NaN or Inf on the calibration data")
        absmax = np.abs(batch).max(axis=0).astype(np.float64)
        if self._absmax is None:
            self._absmax = absmax
            self._sample = np.empty((self._bound, batch.shape[1]), dtype=np.float32)
        elif absmax.shape != self._absmax.shape:
            raise InvalidDataError(f"tensor {self.name!r} has {absmax.shape[0]} channels in one batch and {self._absmax.shape[0]} in another")
        else:
            np.maximum(self._absmax, absmax, out=self._absmax)
        assert self._sample is not None
        # Algorithm R: row t (counted from 0) fills slot t while the sample is not full, then
        # replaces a uniformly chosen slot with probability bound / (t + 1).
        filled = min(max(self._bound - self._seen, 0), len(batch))
        self._sample[self._seen : self._seen + filled] = batch[:filled]
        t = self._seen + np.arange(filled, len(batch))
        slots = self._rng.integers(0, t + 1) if len(t) else t
        for row, slot in zip(range(filled, len(batch)), slots):
            if slot < self._bound:
                self._sample[slot] = batch[row]
        self._seen += len(batch)

    def result(self) -> ChannelStats:
        if self._absmax is None or self._sample is None:
            raise InvalidDataError(f"no calibration data reached tensor {self.name!r}")
        return ChannelStats(self._absmax, self._sample[: min(self._seen, self._bound)].copy(), self._seen)


def collect_channel_stats(
    model: ir.Model, names: list[str], feeds: Iterable[Mapping[str, np.ndarray]], *, rows: int, seed: int = 0,
    total: int | None = None,
) -> dict[str, ChannelStats]:
    """One pass over ``feeds``: the statistics of each tensor in ``names`` (the model is not changed)."""
    by_name = {v.name: v for v in model.graph.inputs}
    by_name.update({out.name: out for node in model.graph for out in node.outputs})
    observation = observation_model(model, names)
    observers = {observed_name(by_name[n]): ChannelStatsObserver(rows, seed, n) for n in names}
    calibrate(ir.to_proto(observation), feeds, observers, show_progress=False, total=total)  # type: ignore[arg-type]
    return {n: observers[observed_name(by_name[n])].result() for n in names}
