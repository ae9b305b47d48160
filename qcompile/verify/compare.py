"""Run a float model and its quantized version on the same feeds and compare their outputs.

Both sessions are made once; every feed (one batch, ``dict[str, np.ndarray]``) runs through both and
each output pair is streamed into an ``OutputComparison``, so nothing holds the outputs of all batches.

Per-layer SQNR: the named tensors (present in both models under the same name) are exposed as extra
graph outputs on copies of the two models. Exposing a tensor can stop onnxruntime from fusing the
node that makes it (a QDQ group whose middle tensor is a graph output is not fused into an int8
kernel), so the model outputs are always compared on the unmodified models, and the layer copies
run in two further sessions only when layers are asked for.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from tqdm import tqdm

from qcompile.errors import InvalidDataError, InvalidModelError, UsageError
from qcompile.verify.metrics import OutputComparison, OutputMetrics, json_float
from qcompile.verify.sessions import Optimization, Provider, make_session

Feed = dict[str, np.ndarray]


@dataclass(frozen=True)
class LayerMetrics:
    name: str
    sqnr_db: float
    cosine: float
    note: str | None = None

    def to_json(self) -> dict[str, Any]:
        """As ``OutputMetrics.to_json``: an infinite SQNR is null, the note tells which infinity."""
        return {
            "name": self.name,
            "sqnr_db": json_float(self.sqnr_db),
            "cosine": json_float(self.cosine),
            "note": self.note,
        }


@dataclass(frozen=True)
class VerificationResult:
    outputs: tuple[OutputMetrics, ...]
    layers: tuple[LayerMetrics, ...]
    samples: int
    provider: str
    seconds: float

    @property
    def min_sqnr(self) -> float:
        """The lowest SQNR over the model outputs (layers are diagnostics, not part of the verdict)."""
        return min(o.sqnr_db for o in self.outputs)

    def passed(self, min_sqnr: float | None) -> bool:
        """Whether every output's SQNR is at least ``min_sqnr``.

        With no threshold, the only failure is an output with NaN or infinite values.
        """
        if min_sqnr is None:
            return all(o.nonfinite == 0 for o in self.outputs)
        return self.min_sqnr >= min_sqnr

    def to_json(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "samples": self.samples,
            "seconds": self.seconds,
            "min_sqnr_db": json_float(self.min_sqnr),
            "outputs": [o.to_json() for o in self.outputs],
            "layers": [layer.to_json() for layer in self.layers],
        }


def compare_models(
    float_model: onnx.ModelProto | ir.Model,
    quant_model: onnx.ModelProto | ir.Model,
    feeds: Iterable[Feed],
    *,
    provider: Provider = "cpu",
    show_progress: bool = False,
    layer_names: Sequence[str] | None = None,
    optimization: Optimization = "all",
    intra_op_threads: int | None = None,
) -> VerificationResult:
    """Compare the outputs of ``quant_model`` with those of ``float_model`` over ``feeds``.

    Outputs are paired by name when every float output name is also a quantized output, otherwise
    by position (the counts must then match). ``layer_names`` asks for the SQNR of those tensors,
    reported in the given order.
    """
    start = time.perf_counter()
    float_proto, quant_proto = _as_proto(float_model), _as_proto(quant_model)
    float_names = [o.name for o in float_proto.graph.output]
    quant_names = _paired_output_names(float_names, [o.name for o in quant_proto.graph.output])
    layer_names = list(layer_names or ())
    if len(set(layer_names)) != len(layer_names):
        raise UsageError(f"layer names are repeated: {layer_names}")

    def session(proto: onnx.ModelProto) -> ort.InferenceSession:
        return make_session(proto, provider, intra_op_threads=intra_op_threads, optimization=optimization)

    runs = [(session(float_proto), float_names, session(quant_proto), quant_names)]
    if layer_names:
        float_layers = with_outputs(float_proto, layer_names, "the float model")
        quant_layers = with_outputs(quant_proto, layer_names, "the quantized model")
        runs.append((session(float_layers), layer_names, session(quant_layers), layer_names))
    input_names = {i.name for i in runs[0][0].get_inputs()}

    outputs = [OutputComparison(name) for name in float_names]
    layers = [OutputComparison(name) for name in layer_names]
    samples = 0
    total = len(feeds) if hasattr(feeds, "__len__") else None
    bar = tqdm(feeds, total=total, desc="verify", unit="batch", file=sys.stderr, disable=None if show_progress else True)
    for index, feed in enumerate(bar):
        _check_feed(feed, input_names, index)
        for (float_sess, f_names, quant_sess, q_names), comparisons in zip(runs, (outputs, layers)):
            refs = _run(float_sess, f_names, feed, index, InvalidDataError, "the float model")
            tests = _run(quant_sess, q_names, feed, index, InvalidModelError, "the quantized model")
            for comparison, ref, test in zip(comparisons, refs, tests):
                comparison.update(ref, test)
        samples += _batch_size(feed)
    if samples == 0:
        raise InvalidDataError("no verification samples: the feeds are empty")

    layer_results = []
    for comparison in layers:
        metrics = comparison.result()
        layer_results.append(LayerMetrics(metrics.name, metrics.sqnr_db, metrics.cosine, metrics.note))
    return VerificationResult(
        outputs=tuple(c.result() for c in outputs),
        layers=tuple(layer_results),
        samples=samples,
        provider=provider,
        seconds=time.perf_counter() - start,
    )


def run_model(
    model: onnx.ModelProto | ir.Model, feeds: Iterable[Feed], provider: Provider = "cpu"
) -> Iterator[list[np.ndarray]]:
    """The outputs of ``model`` for each feed, in graph-output order (one session for all feeds)."""
    sess = make_session(_as_proto(model), provider)
    names = [o.name for o in sess.get_outputs()]
    input_names = {i.name for i in sess.get_inputs()}
    for index, feed in enumerate(feeds):
        _check_feed(feed, input_names, index)
        yield _run(sess, names, feed, index, InvalidDataError, "the model")


def _as_proto(model: onnx.ModelProto | ir.Model) -> onnx.ModelProto:
    if isinstance(model, ir.Model):
        return ir.to_proto(model)
    if isinstance(model, onnx.ModelProto):
        return model
    raise UsageError(f"expected an onnx.ModelProto or ir.Model, got a {type(model).__name__}")


def _paired_output_names(float_names: list[str], quant_names: list[str]) -> list[str]:
    """The quantized output to compare with each float output, in float-output order."""
    if set(float_names) <= set(quant_names):
        return list(float_names)
    if len(float_names) != len(quant_names):
        raise InvalidModelError(
            f"the models' outputs do not match: float {float_names}, quantized {quant_names}"
        )
    return list(quant_names)


def with_outputs(proto: onnx.ModelProto, names: Sequence[str], what: str) -> onnx.ModelProto:
    """A copy of ``proto`` whose graph also outputs ``names`` (only the element type is declared)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    graph = copy.graph
    existing = {o.name for o in graph.output}
    produced = {out for node in graph.node for out in node.output} | {i.name for i in graph.input}
    produced |= {t.name for t in graph.initializer}
    missing = [name for name in names if name not in produced]
    if missing:
        raise UsageError(f"layer tensors not found in {what}: {missing}")
    added = [name for name in names if name not in existing]
    types = _elem_types(copy, added)
    for name in added:
        if name not in types:
            raise InvalidModelError(f"cannot tell the element type of tensor {name!r} in {what}")
        graph.output.append(onnx.helper.make_tensor_value_info(name, types[name], None))
    return copy


def _elem_types(proto: onnx.ModelProto, names: Sequence[str]) -> dict[str, int]:
    """Element types of tensors, from the declared types and, if ``names`` are not all among those,
    from onnx shape inference (which skips ops it does not know, such as contrib ops)."""

    def collect(graph: onnx.GraphProto) -> dict[str, int]:
        types = {t.name: t.data_type for t in graph.initializer}
        for info in [*graph.input, *graph.output, *graph.value_info]:
            if info.type.HasField("tensor_type") and info.type.tensor_type.elem_type:
                types[info.name] = info.type.tensor_type.elem_type
        return types

    types = collect(proto.graph)
    if all(name in types for name in names):
        return types
    try:
        inferred = onnx.shape_inference.infer_shapes(proto)
    except (onnx.shape_inference.InferenceError, ValueError) as exc:
        raise InvalidModelError(f"shape inference failed while adding layer outputs: {exc}") from None
    return {**collect(inferred.graph), **types}


def _check_feed(feed: Feed, input_names: set[str], index: int) -> None:
    if not isinstance(feed, dict):
        raise InvalidDataError(f"batch {index} is a {type(feed).__name__}, not a dict of input name to array")
    missing, unknown = sorted(input_names - feed.keys()), sorted(feed.keys() - input_names)
    if missing or unknown:
        raise InvalidDataError(
            f"batch {index} does not match the model inputs: missing {missing}, unknown {unknown}"
        )


def _run(
    sess: ort.InferenceSession,
    names: list[str],
    feed: Feed,
    index: int,
    error: type[Exception],
    what: str,
) -> list[np.ndarray]:
    try:
        return sess.run(names, feed)
    except Exception as exc:  # onnxruntime's pybind errors derive from Exception only
        raise error(f"{what} failed on batch {index}: {exc}") from None


def _batch_size(feed: Feed) -> int:
    first = next(iter(feed.values()), None)
    return int(np.shape(first)[0]) if first is not None and np.ndim(first) >= 1 else 1
