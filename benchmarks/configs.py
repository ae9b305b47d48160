"""The configurations compared on every case: float, qcompile's, and the peers a user would pick instead.

A configuration names a tool and its parameters (plain JSON, handed to ``benchmarks.worker`` in a
child process). What each peer configuration is, in the peers' own terms:

- ``ort_*``: onnxruntime's ``quantize_static`` in QDQ format, per-channel weights, int8 weights
  with ``WeightSymmetric``, after ``quant_pre_process`` (retried with ``skip_symbolic_shape=True``
  when symbolic shape inference fails). ``u8``/``s8``: uint8 or int8 activations (int8 is its
  default and the slow path on x86). ``minmax``/``percentile``/``entropy``: its calibrate_method.
  ``_padded``: calibrated on the samples padded to one length (for calibrators that stack them).
- ``ort_dynamic``: ``quantize_dynamic`` with its defaults (int8 weights, per tensor), after the same
  pre-processing.
- ``nncf``: ``nncf.quantize`` on the ONNX model with its default preset; ``nncf_transformer`` with
  ``model_type=TRANSFORMER`` (for transformer cases only).

qcompile's rows: its default (uint8 activations, per-channel int8 weights, MSE activation ranges),
``activation_dtype=int8``, ``weight_granularity=per_tensor``, calibration ``method=minmax`` (the
peers' default range method), ``bias_correction_batches=8`` (opt-in bias correction),
``dynamic_matmul=False`` (static QuantizeLinear before MatMuls fed by float ops), SmoothQuant off,
and per case kind: attention MatMuls float (transformers) or optimized weight rounding (the CNNs).

Percentile and Entropy run with uint8 activations only: the calibration method changes the ranges,
the activation type changes the kernels, and uint8 is the type a user on x86 picks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib.util import find_spec
from typing import Any

from benchmarks.cases import Case

BENCH_EXTRA = "pip install -e '.[bench]'"


@dataclass(frozen=True)
class Config:
    name: str
    tool: str  # "float", "qcompile", "ort_static", "ort_dynamic", "nncf"
    # For qcompile: CompileOptions fields by concern, {"scheme": {...}, "calibration": {...}}.
    params: dict[str, Any] = field(default_factory=dict)
    # Python package the tool needs (None: a core dependency of qcompile).
    requires: str | None = None


def configurations(case: Case, *, quick: bool = False) -> list[Config]:
    """Every configuration for ``case``, float first.

    ``quick`` keeps qcompile's default, int8-activation and per-tensor rows and one configuration per
    peer tool: a smoke test of every code path, not a comparison.
    """
    configs = [
        Config("float", "float"),
        Config("qcompile", "qcompile"),
        Config("qcompile_act_int8", "qcompile", {"scheme": {"activation_dtype": "int8"}}),
        Config("qcompile_per_tensor", "qcompile", {"scheme": {"weight_granularity": "per_tensor"}}),
    ]
    if not quick:
        configs += [
            Config("qcompile_minmax", "qcompile", {"calibration": {"method": "minmax"}}),
            Config("qcompile_bias_correction", "qcompile", {"calibration": {"bias_correction_batches": 8}}),
            # The static form of MatMuls fed by float ops (quantize_dynamic_matmul off).
            Config("qcompile_static_matmul", "qcompile", {"scheme": {"dynamic_matmul": False}}),
            Config("qcompile_no_smooth_quant", "qcompile", {"smooth_quant": {"enabled": False}}),
        ]
        if case.nncf_model_type == "transformer":
            # Attention's activation × activation MatMuls float (the default quantizes every MatMul).
            configs.append(Config("qcompile_attention_float", "qcompile", {"scheme": {"quantize_activation_matmuls": False}}))
        else:
            # Opt-in optimized weight rounding (measured no gain on MiniLM, so the CNNs only).
            configs.append(Config("qcompile_weight_rounding", "qcompile", {"calibration": {"weight_rounding": "optimized"}}))
    configs.append(Config("ort_u8_minmax", "ort_static", {"activation_type": "uint8", "method": "minmax"}))
    if not quick:
        configs.append(Config("ort_s8_minmax", "ort_static", {"activation_type": "int8", "method": "minmax"}))
        for method in ("percentile", "entropy"):
            configs.append(Config(f"ort_u8_{method}", "ort_static", {"activation_type": "uint8", "method": method}))
        if case.padded_calibration is not None:
            for method in ("percentile", "entropy"):
                configs.append(
                    Config(f"ort_u8_{method}_padded", "ort_static", {"activation_type": "uint8", "method": method, "padded": True})
                )
        configs.append(Config("ort_dynamic", "ort_dynamic"))
    configs.append(Config("nncf", "nncf", {"model_type": None}, requires="nncf"))
    if case.nncf_model_type is not None:
        configs.append(Config(f"nncf_{case.nncf_model_type}", "nncf", {"model_type": case.nncf_model_type}, requires="nncf"))
    return configs


def missing_requirement(config: Config) -> str | None:
    """How to install the missing package ``config`` needs, or None when it can run here."""
    if config.requires is not None and find_spec(config.requires) is None:
        return BENCH_EXTRA
    return None
