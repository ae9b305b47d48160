"""A recipe: the chosen per-layer precisions with the activation ranges they were built from.

JSON with the qcompile version, the cleaned float model's fingerprint, the calibration data's
fingerprint, the settings that shape the model bytes, each non-default layer's precision (and why),
and every annotated tensor's range. ``qcompile compile --recipe FILE`` rebuilds the same model from
it — no search, no calibration — byte for byte. A recipe made for another model, data, settings or
qcompile version is refused in one line.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from qcompile.errors import UsageError
from qcompile.options import CompileOptions
from qcompile.precision.policy import Assignment, Precision
from qcompile.quant.qparams import QParams
from qcompile.quant.spec import QuantDType, QuantSpec

FORMAT = "qcompile-precision-recipe/1"


def model_fingerprint(cleaned: onnx.ModelProto) -> str:
    return hashlib.sha256(cleaned.SerializeToString(deterministic=True)).hexdigest()


def settings(options: CompileOptions) -> dict[str, Any]:
    """The options (besides the assignment and ranges) that change the compiled bytes."""
    return {
        "activation_dtype": options.scheme.activation_dtype.value,
        "weight_granularity": options.scheme.weight_granularity.value,
        "weight_method": options.calibration.weight_method.value,
        "max_opset": options.output.max_opset,
        "keep_node_metadata": options.output.keep_node_metadata,
    }


@dataclass(frozen=True)
class Recipe:
    version: str
    model: str
    calibration: str
    settings: dict[str, Any]
    assignment: dict[str, Assignment]
    ranges: dict[str, QParams]
    summary: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "qcompile_version": self.version,
            "model_fingerprint": self.model,
            "calibration_fingerprint": self.calibration,
            "settings": self.settings,
            "layers": {name: {"precision": a.precision.value, "reason": a.reason} for name, a in sorted(self.assignment.items())},
            "ranges": {
                name: {
                    "dtype": qp.spec.dtype.value,
                    "symmetric": qp.spec.symmetric,
                    # float32 -> Python float is exact, so the replay gets the same scale bits.
                    "scale": float(np.asarray(qp.scale).reshape(-1)[0]),
                    "zero_point": int(np.asarray(qp.zero_point).reshape(-1)[0]),
                }
                for name, qp in sorted(self.ranges.items())
            },
            "summary": self.summary,
        }

    def save(self, path: str | os.PathLike) -> Path:
        from qcompile.graph.io import write_bytes_atomic

        path = Path(path)
        write_bytes_atomic(path, (json.dumps(self.to_json(), indent=1, allow_nan=False) + "\n").encode())
        return path


def _refuse(path: Path, reason: str) -> UsageError:
    return UsageError(f"recipe {path} {reason}")


def load(path: str | os.PathLike) -> Recipe:
    path = Path(path)
    try:
        content = json.loads(path.read_bytes())
    except OSError as exc:
        raise _refuse(path, f"cannot be read ({exc.strerror or type(exc).__name__})") from None
    except ValueError:
        raise _refuse(path, "is not JSON") from None
    if not isinstance(content, dict) or content.get("format") != FORMAT:
        raise _refuse(path, f"is not a qcompile recipe (no {FORMAT!r} marker)")
    try:
        assignment = {
            str(name): Assignment(Precision(entry["precision"]), str(entry.get("reason", "")))
            for name, entry in content["layers"].items()
        }
        ranges = {}
        for name, entry in content["ranges"].items():
            spec = QuantSpec(QuantDType(entry["dtype"]), symmetric=bool(entry["symmetric"]))
            scale = float(entry["scale"])
            if not math.isfinite(scale) or scale <= 0:
                raise ValueError(f"scale of {name!r}")
            ranges[str(name)] = QParams(np.asarray(scale, dtype=np.float32), np.asarray(int(entry["zero_point"])).astype(spec.dtype.numpy), spec)
        return Recipe(
            version=str(content["qcompile_version"]),
            model=str(content["model_fingerprint"]),
            calibration=str(content["calibration_fingerprint"]),
            settings=dict(content["settings"]),
            assignment=assignment,
            ranges=ranges,
            summary=dict(content.get("summary") or {}),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise _refuse(path, f"is damaged ({type(exc).__name__}: {exc})") from None


def check(recipe: Recipe, path: str | os.PathLike, *, version: str, model: str, calibration: str, options: CompileOptions) -> None:
    """Refuse (one line) a recipe made for another qcompile, model, data or settings."""
    path = Path(path)
    if recipe.version != version:
        raise _refuse(path, f"was made by qcompile {recipe.version}, this is {version}; rerun the search")
    if recipe.model != model:
        raise _refuse(path, f"was made for another model (fingerprint {recipe.model[:12]}…, this model is {model[:12]}…)")
    if recipe.calibration != calibration:
        raise _refuse(
            path, f"was made with other calibration data (fingerprint {recipe.calibration[:12]}…, this data is {calibration[:12]}…)"
        )
    ours = settings(options)
    differs = sorted(k for k in ours if recipe.settings.get(k) != ours[k])
    if differs:
        raise _refuse(path, f"was made with other settings ({', '.join(differs)}); pass the options it was made with")
    if options.scheme.keep_float or options.precision.precision:
        raise _refuse(path, "already holds every layer's precision; drop --keep-float/--precision when replaying it")
