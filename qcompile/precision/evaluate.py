"""Batched onnxruntime runs of candidate models on one fixed set of feeds.

Feeds whose inputs all have a free batch axis and the same per-sample shapes are concatenated into
batches of up to ``batch`` samples, so a candidate costs a few session runs rather than one run per
calibration sample (the suite's CNNs: one or two runs). Variable-length inputs (text) run feed by
feed. The float model's outputs are computed once.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx

from qcompile.verify.sessions import make_session

Feed = dict[str, np.ndarray]
Outputs = list[list[np.ndarray]]


def _batchable(model: onnx.ModelProto) -> bool:
    initializers = {i.name for i in model.graph.initializer}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dims = value.type.tensor_type.shape.dim
        if not dims or dims[0].HasField("dim_value"):
            return False
    return True


def split_samples(feeds: Sequence[Feed]) -> list[Feed]:
    """One feed per sample (row of the batch axis)."""
    out = []
    for feed in feeds:
        n = min(v.shape[0] for v in feed.values()) if feed else 0
        out += [{k: v[i : i + 1] for k, v in feed.items()} for i in range(n)]
    return out


def pack(model: onnx.ModelProto, samples: Sequence[Feed], batch: int = 256) -> list[Feed]:
    """Samples packed into as few feeds as the model allows (in order; same-shape runs concatenated)."""
    if not _batchable(model):
        return list(samples)
    packed: list[Feed] = []
    run: list[Feed] = []

    def flush() -> None:
        if run:
            packed.append({k: np.concatenate([s[k] for s in run]) for k in run[0]})
            run.clear()

    for sample in samples:
        shape = {k: v.shape[1:] for k, v in sample.items()}
        if run and (len(run) >= batch or {k: v.shape[1:] for k, v in run[0].items()} != shape):
            flush()
        run.append(sample)
    flush()
    return packed


class Evaluator:
    """Runs models on fixed feeds (``optimization="all"``: the int8 kernels a deployment runs)."""

    def __init__(self, float_model: onnx.ModelProto, feeds: Sequence[Feed], threads: int | None = None) -> None:
        self.feeds = list(feeds)
        self.threads = threads
        self.reference = self.run(float_model)

    def run(self, model: onnx.ModelProto) -> Outputs:
        session = make_session(model, intra_op_threads=self.threads)
        names = [o.name for o in session.get_outputs()]
        return [session.run(names, feed) for feed in self.feeds]
