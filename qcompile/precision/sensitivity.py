"""Per-layer sensitivity: how much output SQNR keeping one layer in float buys back.

Every layer is measured by the same experiment: quantize everything (the all-int8 model), then keep
just that layer float, and take the output SQNR gain in dB over the all-int8 model
(``gain = SQNR(all int8 but L) - SQNR(all int8)``). "Keep L float" is made by editing the all-int8
model rather than recompiling it: L reads the float tensors its DequantizeLinear inputs came from
(the float weight from the cleaned model, the activation before its QuantizeLinear), so it computes in
float from unrounded inputs; what L's output feeds is unchanged. That costs a proto edit and a
session per layer instead of a compile, and the search then measures real compiled models.
The edit is exact for a layer fed straight from a quantized tensor (a Conv after a Relu); a layer
fed through quantized data movement (an attention MatMul after Reshape/Transpose) still sees the
rounding made before that movement, so its gain is underestimated — which the search, measuring
real models, corrects at the cost of more steps. The measurement runs on a ranking subset of the
calibration data: the samples where the float and all-int8 outputs differ most (largest
1 - cosine), where a layer's damage shows first. Candidates are built from the one calibration's
ranges (``ranges.build_candidate``) and run batched (``evaluate.Evaluator``).

Results are cached beside the calibration cache (``<cache>.sensitivity.json``), keyed by the
calibration cache's fingerprint (model, data, settings), the policy's rules and the ranking samples.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx

from qcompile.data import fingerprint_feeds
from qcompile.graph.io import write_bytes_atomic
from qcompile.precision.budget import min_sqnr_db, sample_errors
from qcompile.precision.evaluate import Evaluator, Feed

FORMAT = "qcompile-sensitivity/1"
_INTEGER_MAKERS = frozenset({"QuantizeLinear", "DynamicQuantizeLinear"})
# Ops whose output has their first input's element type.
_SAME_TYPE_AS_INPUT = frozenset({"Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Split", "Slice", "Gather", "Concat"})


def _is_float(name: str, producers: dict, inputs: set[str], initializers: set[str]) -> bool:
    """Whether ``name`` exists in the model and is not integer data (followed back through data
    movement to the op that made it; the compiled graph carries no intermediate types)."""
    while name not in inputs and name not in initializers:
        node = producers.get(name)
        if node is None or node.op_type in _INTEGER_MAKERS:
            return False
        if node.op_type not in _SAME_TYPE_AS_INPUT:
            return True
        name = node.input[0]
    return True


@dataclass(frozen=True)
class LayerSensitivity:
    name: str
    op_type: str
    sqnr_db: float  # output SQNR on the ranking subset with only this layer float
    gain_db: float  # over the all-int8 model on the same subset


def ranking_subset(samples: Sequence[Feed], reference, int8_outputs, size: int) -> list[int]:
    """Indices of the ``size`` samples whose all-int8 outputs are furthest from float's (1 - cosine)."""
    errors = sample_errors(reference, int8_outputs)
    order = np.argsort(-np.asarray(errors), kind="stable")[:size]
    return sorted(int(i) for i in order)


def keep_float_variant(int8: onnx.ModelProto, cleaned: onnx.ModelProto, layer: str) -> onnx.ModelProto | None:
    """The all-int8 model with ``layer`` reading its float inputs (its weights from ``cleaned``).

    None when the int8 model no longer holds ``layer`` as the same op (a later pass rewrote it,
    e.g. run-time quantization made it a MatMulInteger): the edit does not apply there.
    """
    variant = onnx.ModelProto()
    variant.CopyFrom(int8)
    float_node = next(n for n in cleaned.graph.node if n.name == layer)
    node = next((n for n in variant.graph.node if n.name == layer and n.op_type == float_node.op_type), None)
    if node is None:
        return None
    have = {i.name for i in variant.graph.initializer}
    float_initializers = {i.name: i for i in cleaned.graph.initializer}
    producers = {o: n for n in variant.graph.node for o in n.output}
    inputs = {i.name for i in variant.graph.input}
    for name in float_node.input:
        # The float tensor must still exist as float: where a pass moved the quantization before
        # the data movement (sibling fusion quantizes Q/K/V once before their Reshape/Transpose),
        # the float tensor L read is gone and only a compile can keep L float.
        if name and name not in float_initializers and not _is_float(name, producers, inputs, have):
            return None
    for index, name in enumerate(float_node.input):
        if index < len(node.input):
            node.input[index] = name
        if name in float_initializers and name not in have:
            variant.graph.initializer.append(float_initializers[name])
            have.add(name)
    return variant


def measure(
    layers: Sequence[tuple[str, str]],
    int8: onnx.ModelProto,
    cleaned: onnx.ModelProto,
    evaluator: Evaluator,
    int8_sqnr: float,
    build: Callable[[frozenset[str]], onnx.ModelProto] | None = None,
) -> list[LayerSensitivity]:
    """Keep-one-float gain of each (name, op_type), most sensitive first.

    ``build`` compiles the model with the given layers float: used for a layer the edit cannot
    reach (``keep_float_variant`` gives None).
    """
    out = []
    for name, op_type in layers:
        variant = keep_float_variant(int8, cleaned, name)
        if variant is None:
            if build is None:
                raise ValueError(f"layer {name} was rewritten in the int8 model and no build function was given")
            variant = build(frozenset({name}))
        sqnr = min_sqnr_db(evaluator.reference, evaluator.run(variant))
        gain = sqnr - int8_sqnr if math.isfinite(sqnr) else 99.0
        out.append(LayerSensitivity(name, op_type, float(sqnr), float(gain)))
    return sorted(out, key=lambda s: -s.gain_db)


def cache_path(calibration_cache: str | None) -> Path | None:
    return None if calibration_cache is None else Path(f"{calibration_cache}.sensitivity.json")


def cache_key(calibration_fingerprint: str, rules: Sequence[str], samples: Sequence[Feed]) -> str:
    digest = hashlib.sha256(json.dumps({"calibration": calibration_fingerprint, "rules": list(rules)}).encode())
    for _ in fingerprint_feeds(samples, digest):
        pass
    return digest.hexdigest()


def read_cached(path: Path | None, key: str) -> list[LayerSensitivity] | None:
    """The cached sensitivities for ``key``; None when absent or made for another key (recomputed)."""
    if path is None or not path.is_file():
        return None
    try:
        content = json.loads(path.read_bytes())
        if content.get("format") != FORMAT or content.get("key") != key:
            return None
        return [LayerSensitivity(str(e["name"]), str(e["op_type"]), float(e["sqnr_db"]), float(e["gain_db"])) for e in content["layers"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def write_cached(path: Path | None, key: str, layers: Sequence[LayerSensitivity]) -> None:
    if path is None:
        return
    content = {"format": FORMAT, "key": key, "layers": [asdict(s) for s in layers]}
    write_bytes_atomic(path, (json.dumps(content, indent=1) + "\n").encode())
