"""Tiny models for the precision tests, built in code with seeded weights."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from tests.helpers import parse_model

CHAIN = """<ir_version: 8, opset_import: ["" : 17]>
g (float[N,16] x) => (float[N,8] y) {
  a = MatMul (x, w1)
  ra = Relu (a)
  b = MatMul (ra, w2)
  rb = Relu (b)
  y = MatMul (rb, w3)
}"""


def chain(outlier: float = 0.0, seed: int = 0) -> ir.Model:
    """x -> MatMul -> Relu -> MatMul -> Relu -> MatMul. ``outlier`` (> 1) scales w1's first output
    channel up and w2's first input row down by that factor: the float function is unchanged, but
    mm2's input ``ra`` gets one channel ``outlier`` times larger than the rest, and its per-tensor
    int8 scale rounds every other channel to a few levels: mm2 is the layer int8 hurts."""
    rng = np.random.default_rng(seed)
    w1 = rng.normal(size=(16, 16)).astype(np.float32) / 4
    w2 = rng.normal(size=(16, 16)).astype(np.float32) / 4
    if outlier:
        w1[:, 0] *= outlier
        w2[0, :] /= outlier
    model = parse_model(
        CHAIN,
        dict(
            w1=w1,
            w2=w2,
            w3=rng.normal(size=(16, 8)).astype(np.float32) / 4,
        ),
    )
    for node, name in zip(model.graph, ("mm1", "relu1", "mm2", "relu2", "mm3")):
        node.name = name
    return model


def feeds(n: int = 12, batch: int = 8, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(size=(batch, 16)).astype(np.float32)} for _ in range(n)]
