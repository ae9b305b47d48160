"""The calibration cache: calibrated activation ranges saved as JSON, reused when nothing changed.

A cache file is keyed by three fingerprints, all decidable before any calibration runs:

- model: SHA-256 of the cleaned-up, annotated model (graph structure and weights, serialized) and
  of each qparams group's spec (the annotation, which the serialized model does not carry). It is
  taken after SmoothQuant, so it covers the smoothing chosen (scaled weights, new Muls); that
  choice's own data pass runs on a cache hit too;
- data: SHA-256 of the calibration feeds' names, dtypes, shapes and bytes, streamed in a first pass
  over the data (no model run) — the same hash the report calls the calibration fingerprint;
- settings: the observer settings (method, and percentile / bins where they apply), the cache
  format and the qcompile version.

Use (``CalibrationOptions.cache``, ``--calibration-cache FILE``): a file whose key matches is used
and the data pass is skipped; an absent file is computed and written atomically; a file with
another key is refused (UsageError) rather than silently overwritten. The file is JSON data only —
read with ``json.loads`` and checked field by field, never executed.
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
from qcompile.options import CalibrationMethod, CalibrationOptions
from qcompile.quant.qparams import QParams
from qcompile.quant.spec import QuantSpec

FORMAT = "qcompile-calibration-cache/1"


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


def read_cache(path: str | os.PathLike, key: CacheKey, specs: Mapping[str, QuantSpec]) -> CachedCalibration | None:
    """The cached ranges when ``path`` holds this key; None when the file is absent.

    Raises UsageError when the file was made for another model, data or settings, or is not a cache.
    """
    path = Path(path)
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
    if not isinstance(content, dict) or content.get("format") != FORMAT:
        raise _invalid(path, f"no {FORMAT!r} format marker")
    stored = content.get("key")
    if content.get("fingerprint") != key.fingerprint:
        differs = [part for part in ("model", "data", "settings") if not isinstance(stored, dict) or stored.get(part) != key.to_json()[part]]
        what = "/".join(differs) or "model/data/settings"
        raise UsageError(
            f"calibration cache {path} was made for another {what} (fingerprint "
            f"{str(content.get('fingerprint'))[:12]}…, this compile needs {key.fingerprint[:12]}…); "
            "delete it or pass another path"
        )
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
    """Write the ranges under ``key`` (atomically: temporary file, fsync, rename)."""
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
        "format": FORMAT,
        "fingerprint": key.fingerprint,
        "key": key.to_json(),
        "calibration": {"feeds": feeds, "samples": samples},
        "ranges": ranges,
    }
    write_bytes_atomic(Path(path), (json.dumps(content, indent=1, sort_keys=True) + "\n").encode())
