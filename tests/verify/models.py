"""Tiny models shared by the verification tests: a two-layer MLP and perturbed copies of it."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir

from tests.helpers import parse_model, to_proto

RNG_SEED = 0
CONSTANT = 0.05  # what the perturbed copies add

_HEADER = '<ir_version: 8, opset_import: ["" : 13]>'


def weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(RNG_SEED)
    return {
        "W1": rng.standard_normal((4, 5)).astype(np.float32),
        "W2": rng.standard_normal((5, 3)).astype(np.float32),
        "C": np.array(CONSTANT, dtype=np.float32),
    }


def mlp(*, add_to_output: bool = False, add_to_hidden: bool = False) -> onnx.ModelProto:
    """y = relu(x·W1 [+ C]) · W2 [+ C]; the tensors h (x·W1) and r (the relu) keep their names."""
    hidden = "h_in = Add(h, C)" if add_to_hidden else "h_in = Identity(h)"
    output = "y0 = MatMul(r, W2)\n y = Add(y0, C)" if add_to_output else "y = MatMul(r, W2)"
    text = f"""
    {_HEADER}
    mlp (float[N, 4] x) => (float[N, 3] y) {{
        h = MatMul(x, W1)
        {hidden}
        r = Relu(h_in)
        {output}
    }}
    """
    return to_proto(parse_model(text, weights()))


def mlp_ir() -> ir.Model:
    return ir.from_proto(mlp())


def numpy_mlp(
    x: np.ndarray, *, add_to_output: bool = False, add_to_hidden: bool = False
) -> dict[str, np.ndarray]:
    """The same computation in float64 numpy, every named tensor of it."""
    w = {k: v.astype(np.float64) for k, v in weights().items()}
    h = x.astype(np.float64) @ w["W1"]
    r = np.maximum(h + (CONSTANT if add_to_hidden else 0.0), 0.0)
    y = r @ w["W2"] + (CONSTANT if add_to_output else 0.0)
    return {"h": h, "r": r, "y": y}


def feeds(batches: int = 3, batch_size: int = 4, seed: int = 1) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((batch_size, 4)).astype(np.float32)} for _ in range(batches)]


def model_from_text(body: str, signature: str = "(float[N, 4] x) => (float[N, 4] y)") -> onnx.ModelProto:
    return to_proto(parse_model(f"{_HEADER}\n g {signature} {{ {body} }}"))
