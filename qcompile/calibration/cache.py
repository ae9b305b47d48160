"""The calibration cache: calibrated activation ranges and SmoothQuant's decisions saved as JSON,
reused when nothing changed.

A cache file holds up to two sections, each under its own key of three fingerprints, all decidable
before any model run:

- the ranges (top level: ``fingerprint``, ``key``, ``calibration``, ``ranges``). model: SHA-256 of
  the cleaned-up, annotated model (graph structure and weights, serialized) and of each qparams
  group's spec (the annotation, which the serialized model does not carry); it is taken after
  SmoothQuant, so it covers the smoothing applied (scaled weights, new Muls). settings: the observer
  settings (method, and percentile / bins where they apply);
- SmoothQuant's decisions (``smooth_quant``: α, range method, simulated errors and the factors s of
  each group, ``calibration/smoothing``). model: the annotated model before smoothing (serialized,
  plus which nodes run int8, which decides the groups). settings: every option the search reads
  (``SmoothQuantOptions``, the sampling seed, the observer and weight settings, the scheme). A hit
  skips SmoothQuant's statistics pass; the decisions are a pure function of what the key covers, so
  the smoothed model is the same bytes.

Both share data (SHA-256 of the calibration feeds' names, dtypes, shapes and bytes, streamed in one
pass over the data with no model run — the same hash the report calls the calibration fingerprint),
the cache format and the qcompile version. A warm compile reads the data once, for that hash.

Use (``CalibrationOptions.cache``, ``--calibration-cache FILE``): a section whose key matches is
used and its data pass skipped; a missing section (an absent file, a file of the previous format
``qcompile-calibration-cache/1``, which had no SmoothQuant section) is computed and written
atomically beside the other section; a section with another key is refused (UsageError) rather than
silently overwritten. The file is JSON data only — read with ``json.loads`` and checked field by
field, never executed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from qcompile.errors import UsageError
from qcompile.graph.io import write_bytes_atomic
from qcompile.calibration.smoothing import SmoothDecision
from qcompile.options import CalibrationMethod, CalibrationOptions, SchemeOptions, SmoothQuantOptions
from qcompile.quant.qparams import QParams
from qcompile.quant.spec import DECISION_KEY, QuantSpec

FORMAT = "qcompile-calibration-cache/2"
# Files of these formats are ours but lack a section this version needs: a miss, then overwritten.
OLD_FORMATS = ("qcompile-calibration-cache/1",)
# The ranges section's fields (at the top level, as in the first format) and SmoothQuant's section.
_RANGE_FIELDS = ("fingerprint", "key", "calibration", "ranges")
_SMOOTHING = "smooth_quant"


@dataclass(frozen=True)
class CacheKey:
    model: str
    data: str
    settings: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"model": self.model, "data": self.data, "settings": dict(self.settings)}

    @property
    def fingerprint(self) -> str:
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class CachedCalibration:
    qparams: dict[str, QParams]
    feeds: int
    samples: int


def _spec_json(spec: QuantSpec) -> dict[str, Any]:
    return {"dtype": spec.dtype.value, "symmetric": spec.symmetric, "axis": spec.axis}


def model_fingerprint(model: ir.Model, specs: Mapping[str, QuantSpec]) -> str:
    """SHA-256 of the annotated model: serialized graph and weights, plus every group's spec."""
    digest = hashlib.sha256()
    digest.update(ir.to_proto(model).SerializeToString(deterministic=True))
    digest.update(json.dumps({group: _spec_json(spec) for group, spec in specs.items()}, sort_keys=True).encode())
    return digest.hexdigest()


def observer_settings(options: CalibrationOptions) -> dict[str, Any]:
    """What decides the ranges besides model and data (only the settings the method reads)."""
    from qcompile import __version__

    settings: dict[str, Any] = {"format": FORMAT, "qcompile_version": __version__, "method": options.method.value}
    if options.method != CalibrationMethod.MINMAX:
        settings["bins"] = options.bins
    if options.method == CalibrationMethod.PERCENTILE:
        settings["percentile"] = options.percentile
    return settings


def _invalid(path: Path, reason: str) -> UsageError:
    return UsageError(
        f"calibration cache {path} is not a valid qcompile calibration cache ({reason}); delete it or pass another path"
    )


def _qparams_from_json(path: Path, group: str, entry: Any, spec: QuantSpec) -> QParams:
    if not isinstance(entry, dict) or entry.get("spec") != _spec_json(spec):
        raise _invalid(path, f"the entry of {group!r} does not match its quantization spec")
    scale, zero_point = entry.get("scale"), entry.get("zero_point")
    numbers = (scale if isinstance(scale, list) else [scale]) + (zero_point if isinstance(zero_point, list) else [zero_point])
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in numbers):
        raise _invalid(path, f"the entry of {group!r} has a scale or zero point that is not a finite number")
    try:
        return QParams(np.asarray(scale, dtype=np.float32), np.asarray(zero_point).astype(spec.dtype.numpy), spec)
    except ValueError as exc:
        raise _invalid(path, f"the entry of {group!r}: {exc}") from None


def _load(path: Path) -> dict[str, Any] | None:
    """The file's sections; None when it is absent or of an old format (a miss). Raises UsageError
    when the path cannot hold a cache or the file is not one."""
    if not path.exists():
        if not path.parent.exists():
            raise UsageError(f"calibration cache folder does not exist: {path.parent}")
        return None
    if not path.is_file():
        raise UsageError(f"calibration cache {path} is not a file")
    try:
        content = json.loads(path.read_bytes())
    except (OSError, ValueError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise _invalid(path, f"unreadable: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    if isinstance(content, dict) and content.get("format") in OLD_FORMATS:
        return None
    if not isinstance(content, dict) or content.get("format") != FORMAT:
        raise _invalid(path, f"no {FORMAT!r} format marker")
    return content


def _stale(path: Path, section: str, stored: Any, fingerprint: Any, key: CacheKey) -> UsageError:
    differs = [part for part in ("model", "data", "settings") if not isinstance(stored, dict) or stored.get(part) != key.to_json()[part]]
    what = "/".join(differs) or "model/data/settings"
    return UsageError(
        f"calibration cache {path}{section} was made for another {what} (fingerprint "
        f"{str(fingerprint)[:12]}…, this compile needs {key.fingerprint[:12]}…); delete it or pass another path"
    )


def _write(path: Path, section: dict[str, Any], replaces: tuple[str, ...]) -> None:
    """Write one section (atomically: temporary file, fsync, rename), keeping the file's other one."""
    existing = _load(path) or {}
    content = {k: v for k, v in existing.items() if k not in replaces}
    content.update(section, format=FORMAT)
    write_bytes_atomic(path, (json.dumps(content, indent=1, sort_keys=True) + "\n").encode())


def read_cache(path: str | os.PathLike, key: CacheKey, specs: Mapping[str, QuantSpec]) -> CachedCalibration | None:
    """The cached ranges when ``path`` holds this key; None when the file or its ranges are absent.

    Raises UsageError when the ranges were made for another model, data or settings, or the file is not a cache.
    """
    path = Path(path)
    content = _load(path)
    if content is None or "fingerprint" not in content:
        return None
    if content.get("fingerprint") != key.fingerprint:
        raise _stale(path, "", content.get("key"), content.get("fingerprint"), key)
    ranges = content.get("ranges")
    if not isinstance(ranges, dict) or set(ranges) != set(specs):
        raise _invalid(path, "its tensor groups are not the model's")
    calibration = content.get("calibration")
    if not isinstance(calibration, dict) or not all(isinstance(calibration.get(k), int) for k in ("feeds", "samples")):
        raise _invalid(path, "no feed and sample counts")
    qparams = {group: _qparams_from_json(path, group, ranges[group], spec) for group, spec in specs.items()}
    return CachedCalibration(qparams=qparams, feeds=calibration["feeds"], samples=calibration["samples"])


def write_cache(
    path: str | os.PathLike, key: CacheKey, qparams: Mapping[str, QParams], *, feeds: int, samples: int
) -> None:
    """Write the ranges under ``key``, keeping the file's SmoothQuant section."""
    ranges = {
        group: {
            "spec": _spec_json(qp.spec),
            # float32 → Python float is exact and JSON round-trips it, so a hit gives identical scales.
            "scale": qp.scale.astype(float).tolist(),
            "zero_point": qp.zero_point.astype(int).tolist(),
        }
        for group, qp in qparams.items()
    }
    content = {
        "fingerprint": key.fingerprint,
        "key": key.to_json(),
        "calibration": {"feeds": feeds, "samples": samples},
        "ranges": ranges,
    }
    _write(Path(path), content, _RANGE_FIELDS)


# --- SmoothQuant's section -------------------------------------------------------------------------


def smoothing_model_fingerprint(model: ir.Model) -> str:
    """SHA-256 of the annotated model before smoothing: serialized graph and weights, plus which
    nodes run int8 (the annotation, which decides the groups and which the serialized model does not carry)."""
    digest = hashlib.sha256()
    digest.update(ir.to_proto(model).SerializeToString(deterministic=True))
    quantized = {node.name: bool(d.quantized) for node in model.graph if (d := node.meta.get(DECISION_KEY)) is not None}
    digest.update(json.dumps(quantized, sort_keys=True).encode())
    return digest.hexdigest()


def smoothing_settings(options: SmoothQuantOptions, scheme: SchemeOptions, calibration: CalibrationOptions) -> dict[str, Any]:
    """Every option the α search reads (``calibration/smoothing``), with the format and version."""
    settings = observer_settings(calibration)  # the configured method's observer; min/max reads none
    settings.update(
        alphas=list(options.alphas),
        min_gain=options.min_gain,
        rows=options.rows,
        seed=calibration.seed,  # the reservoir sample
        weight_method=calibration.weight_method.value,
        activation_dtype=scheme.activation_dtype.value,
        weight_granularity=scheme.weight_granularity.value,
    )
    return settings


def smoothing_key(
    model: ir.Model, data: str, options: SmoothQuantOptions, scheme: SchemeOptions, calibration: CalibrationOptions
) -> CacheKey:
    """The key of SmoothQuant's decisions on the annotated, not yet smoothed ``model``; ``data`` is the feeds' fingerprint."""
    return CacheKey(smoothing_model_fingerprint(model), data, smoothing_settings(options, scheme, calibration))


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _decision_from_json(path: Path, name: str, entry: Any) -> SmoothDecision:
    bad = _invalid(path, f"the SmoothQuant entry of {name!r} is damaged")
    if not isinstance(entry, dict) or not all(_finite(entry.get(k)) for k in ("baseline", "error")):
        raise bad
    alpha, factors = entry.get("alpha"), entry.get("factors")
    if not (alpha is None or _finite(alpha)) or not (factors is None or (isinstance(factors, list) and factors)):
        raise bad
    if factors is not None and not all(_finite(f) and f > 0 for f in factors):
        raise bad
    try:
        method = CalibrationMethod(entry.get("method"))
    except ValueError:
        raise bad from None
    array = None if factors is None else np.asarray(factors, dtype=np.float64)
    return SmoothDecision(alpha, method, float(entry["baseline"]), float(entry["error"]), array)


def read_smoothing(path: str | os.PathLike, key: CacheKey) -> dict[str, SmoothDecision] | None:
    """SmoothQuant's decisions by tensor when ``path`` holds this key; None when the file or its
    SmoothQuant section is absent. Raises UsageError when they were made for another key."""
    path = Path(path)
    content = _load(path)
    if content is None or _SMOOTHING not in content:
        return None
    section = content[_SMOOTHING]
    if not isinstance(section, dict):
        raise _invalid(path, "its SmoothQuant section is not an object")
    if section.get("fingerprint") != key.fingerprint:
        raise _stale(path, " (its SmoothQuant decisions)", section.get("key"), section.get("fingerprint"), key)
    groups = section.get("groups")
    if not isinstance(groups, dict):
        raise _invalid(path, "its SmoothQuant section has no groups")
    return {name: _decision_from_json(path, name, entry) for name, entry in groups.items()}


def write_smoothing(path: str | os.PathLike, key: CacheKey, decisions: Mapping[str, SmoothDecision]) -> None:
    """Write SmoothQuant's decisions under ``key``, keeping the file's ranges."""
    groups = {
        name: {
            "alpha": d.alpha,
            "method": d.method.value,
            # Python floats (float64) round-trip JSON exactly: a hit scales the weights by the same s.
            "baseline": d.baseline,
            "error": d.error,
            "factors": None if d.factors is None else d.factors.astype(float).tolist(),
        }
        for name, d in decisions.items()
    }
    section = {"fingerprint": key.fingerprint, "key": key.to_json(), "groups": groups}
    _write(Path(path), {_SMOOTHING: section}, (_SMOOTHING,))
