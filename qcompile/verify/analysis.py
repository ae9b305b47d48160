"""Error analysis of a quantized model against its float original, layer by layer.

For every quantized activation ``t`` (a QuantizeLinear in the quantized model whose input the float
model also computes), over the data:

- SQNR and cosine of the dequantized tensor against the float model's ``t`` (this includes all the
  error upstream of ``t``, so the curve in graph order shows where error enters);
- clipping rate: the fraction of the quantized model's values of ``t`` outside the range its
  scale/zero point can represent, [(qmin - zp)·s, (qmax - zp)·s], and the observed range;
- the first layer where SQNR falls by ``drop_db`` or more below the previous one.

Weights: the rounding error estimated from the scales (uniform rounding noise s²/12 per element
against the energy of the dequantized weights), as an SQNR in dB per weight tensor. Biases: the
largest |int32| value as a fraction of the int32 limit (1.0 = saturated).
"""

from __future__ import annotations

import html
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from qcompile.verify.compare import with_outputs
from qcompile.verify.metrics import OutputComparison, json_float
from qcompile.verify.sessions import make_session

_INT32_MAX = float(np.iinfo(np.int32).max)


@dataclass(frozen=True)
class ActivationError:
    name: str
    sqnr_db: float
    cosine: float
    clip_rate: float
    observed_min: float
    observed_max: float
    representable_min: float
    representable_max: float

    def to_json(self) -> dict[str, Any]:
        return {k: (json_float(v) if isinstance(v, float) else v) for k, v in vars(self).items()}


@dataclass(frozen=True)
class WeightError:
    name: str
    estimated_sqnr_db: float
    channels: int

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "estimated_sqnr_db": json_float(self.estimated_sqnr_db), "channels": self.channels}


@dataclass(frozen=True)
class BiasUse:
    name: str
    largest_fraction_of_int32: float

    @property
    def saturated(self) -> bool:
        return self.largest_fraction_of_int32 >= 1.0

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "largest_fraction_of_int32": self.largest_fraction_of_int32, "saturated": self.saturated}


@dataclass(frozen=True)
class Analysis:
    activations: tuple[ActivationError, ...]
    first_sharp_drop: str | None
    drop_db: float
    weights: tuple[WeightError, ...]
    biases: tuple[BiasUse, ...]
    samples: int

    def to_json(self) -> dict[str, Any]:
        return {
            "samples": self.samples,
            "drop_db": self.drop_db,
            "first_sharp_drop": self.first_sharp_drop,
            "activations": [a.to_json() for a in self.activations],
            "weights": [w.to_json() for w in self.weights],
            "biases": [b.to_json() for b in self.biases],
        }

    def render_text(self) -> str:
        lines = [f"per-layer error over {self.samples} samples (graph order)"]
        lines.append(f"{'tensor':40s} {'SQNR dB':>8s} {'cosine':>8s} {'clipped':>8s}  observed range / representable range")
        for a in self.activations:
            mark = "  <- first sharp drop" if a.name == self.first_sharp_drop else ""
            lines.append(
                f"{a.name[:40]:40s} {a.sqnr_db:8.2f} {a.cosine:8.5f} {a.clip_rate:8.2%}  "
                f"[{a.observed_min:.4g}, {a.observed_max:.4g}] / [{a.representable_min:.4g}, {a.representable_max:.4g}]{mark}"
            )
        if self.first_sharp_drop is None:
            lines.append(f"no layer loses {self.drop_db:g} dB or more against the one before it")
        lines += ["", "weights (rounding error estimated from the scales)"]
        lines += [f"  {w.name[:60]:60s} {w.estimated_sqnr_db:7.2f} dB  ({w.channels} scales)" for w in self.weights]
        saturated = [b.name for b in self.biases if b.saturated]
        worst = max((b.largest_fraction_of_int32 for b in self.biases), default=0.0)
        lines.append(
            f"\nbiases: {len(self.biases)} int32, largest uses {worst:.2e} of the int32 range; saturated: {saturated or 'none'}"
        )
        return "\n".join(lines)

    def render_html(self) -> str:
        """A self-contained page: the SQNR curve through the network (inline SVG) and the table."""
        width, height, pad = 900, 320, 40
        values = [a.sqnr_db if math.isfinite(a.sqnr_db) else 100.0 for a in self.activations]
        top = max(values + [1.0])
        n = max(len(values) - 1, 1)
        points = " ".join(
            f"{pad + i * (width - 2 * pad) / n:.1f},{height - pad - v / top * (height - 2 * pad):.1f}"
            for i, v in enumerate(values)
        )
        rows = "".join(
            f"<tr><td>{i}</td><td>{html.escape(a.name)}</td><td>{a.sqnr_db:.2f}</td><td>{a.clip_rate:.2%}</td></tr>"
            for i, a in enumerate(self.activations)
        )
        return (
            "<!doctype html><meta charset='utf-8'><title>qcompile analysis</title>"
            f"<h1>SQNR through the network ({self.samples} samples)</h1>"
            f"<svg width='{width}' height='{height}' style='border:1px solid #ccc'>"
            f"<text x='5' y='15' font-size='12'>{top:.0f} dB</text><text x='5' y='{height - pad}' font-size='12'>0 dB</text>"
            f"<polyline fill='none' stroke='#1f77b4' stroke-width='2' points='{points}'/></svg>"
            f"<p>first sharp drop: {html.escape(str(self.first_sharp_drop))}</p>"
            "<table border='1' cellpadding='3'><tr><th>#</th><th>tensor</th><th>SQNR dB</th><th>clipped</th></tr>"
            f"{rows}</table>"
        )


def _initializers(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in graph.initializer}


def _quantized_activations(quant: onnx.ModelProto, float_names: set[str]) -> list[tuple[str, str, float, int, int, int]]:
    """(tensor, dequantized tensor, scale, zero point, qmin, qmax) per QuantizeLinear, graph order."""
    graph = quant.graph
    inits = _initializers(graph)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    found = []
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] not in float_names:
            continue
        dqs = [c for c in consumers.get(node.output[0], []) if c.op_type == "DequantizeLinear"]
        if not dqs or node.input[1] not in inits:
            continue
        scale = float(inits[node.input[1]].reshape(-1)[0])
        zp_array = inits.get(node.input[2]) if len(node.input) > 2 else None
        dtype = zp_array.dtype if zp_array is not None else np.dtype(np.uint8)
        zp = int(zp_array.reshape(-1)[0]) if zp_array is not None else 0
        info = np.iinfo(dtype)
        found.append((node.input[0], dqs[0].output[0], scale, zp, int(info.min), int(info.max)))
    return found


def _weights_and_biases(quant: onnx.ModelProto) -> tuple[list[WeightError], list[BiasUse]]:
    inits = _initializers(quant.graph)
    weights, biases = [], []
    for node in quant.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits:
            continue
        q = inits[node.input[0]]
        scale = inits.get(node.input[1])
        if scale is None:
            continue
        if q.dtype == np.int32:
            biases.append(BiasUse(node.input[0], float(np.abs(q.astype(np.float64)).max(initial=0.0) / _INT32_MAX)))
        elif q.dtype == np.int8:
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
            shape = [1] * q.ndim
            if scale.ndim == 1 and q.ndim:
                shape[axis % q.ndim] = scale.shape[0]
            dequantized = q.astype(np.float64) * scale.reshape(shape)
            noise = float(np.sum(np.broadcast_to(scale.reshape(shape).astype(np.float64) ** 2 / 12.0, q.shape)))
            signal = float(np.sum(dequantized**2))
            sqnr = 10 * math.log10(signal / noise) if noise > 0 and signal > 0 else float("inf")
            weights.append(WeightError(node.input[0], sqnr, int(scale.size)))
    return weights, biases


def analyze(
    float_model: onnx.ModelProto, quant_model: onnx.ModelProto, feeds: Iterable[dict[str, np.ndarray]], *, drop_db: float = 6.0
) -> Analysis:
    float_names = {o for n in float_model.graph.node for o in n.output} | {i.name for i in float_model.graph.input}
    layers = _quantized_activations(quant_model, float_names)
    tensors = [t for t, *_ in layers]
    dequantized = [d for _, d, *_ in layers]
    float_sess = make_session(with_outputs(float_model, tensors, "the float model"))
    quant_sess = make_session(with_outputs(quant_model, dequantized + tensors, "the quantized model"))
    comparisons = [OutputComparison(t) for t in tensors]
    clipped = np.zeros(len(layers))
    counts = np.zeros(len(layers))
    lo = np.full(len(layers), np.inf)
    hi = np.full(len(layers), -np.inf)
    samples = 0
    for feed in feeds:
        refs = float_sess.run(tensors, feed)
        outs = quant_sess.run(dequantized + tensors, feed)
        for i, (t, _, scale, zp, qmin, qmax) in enumerate(layers):
            comparisons[i].update(refs[i], outs[i])
            raw = outs[len(layers) + i]
            low, high = (qmin - zp) * scale, (qmax - zp) * scale
            clipped[i] += np.count_nonzero((raw < low - scale / 2) | (raw > high + scale / 2))
            counts[i] += raw.size
            lo[i], hi[i] = min(lo[i], float(raw.min(initial=np.inf))), max(hi[i], float(raw.max(initial=-np.inf)))
        first = next(iter(feed.values()))
        samples += int(first.shape[0]) if np.ndim(first) else 1
    activations = []
    for i, (t, _, scale, zp, qmin, qmax) in enumerate(layers):
        metrics = comparisons[i].result()
        activations.append(
            ActivationError(
                t, metrics.sqnr_db, metrics.cosine, float(clipped[i] / max(counts[i], 1)),
                float(lo[i]), float(hi[i]), (qmin - zp) * scale, (qmax - zp) * scale,
            )
        )
    first_drop = None
    for previous, current in zip(activations, activations[1:]):
        if math.isfinite(previous.sqnr_db) and previous.sqnr_db - current.sqnr_db >= drop_db:
            first_drop = current.name
            break
    weights, biases = _weights_and_biases(quant_model)
    return Analysis(tuple(activations), first_drop, drop_db, tuple(weights), tuple(biases), samples)
