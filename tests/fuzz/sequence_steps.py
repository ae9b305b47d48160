"""Transformer-like steps for the graph fuzzer (``graphs.py``): what the MatMul passes rewrite.

A sequence model's input is (N, S, D) (batch symbolic, S tokens of D features). The steps:

- siblings: 2-4 MatMuls (each with or without a bias Add, equal or unequal widths) reading one
  float tensor (the graph input, a LayerNormalization, a residual Add), joined by Concat, Add or
  each a graph output (``fuse_sibling_matmuls``); also in the 2-D table of ``graphs.py``;
- attention: Q/K/V projections → Reshape to heads (a constant shape, or one computed by
  Shape/Gather/Concat with -1) → Transpose → MatMul(q, kᵀ) → Mul or Div by a positive or negative
  constant → optional additive mask → Softmax → MatMul(p, v) → Transpose → Reshape → output
  projection, optionally residual (grouped QuantizeLinear, ``fold_matmul_scale`` on the scores,
  ``fold_smoothing_mul`` on the context; V's weight sometimes has outlier columns so SmoothQuant
  smooths the output projection's input);
- scaled MatMul: a constant scalar Mul/Div after a MatMul, the MatMul output sometimes read by
  another op too (``fold_matmul_scale`` must then leave it);
- LayerNormalization, sometimes with outlier channels in its scale (SmoothQuant folds into it), and
  a per-channel Mul with outlier channels (SmoothQuant must leave a Mul);
- feed-forward (MatMul → activation → MatMul, residual), activations, mean over tokens to 2-D.

Every step takes (draw, builder, tensor) and returns the new current tensor, as in ``graphs.py``.
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

SEQ_WIDTHS = (4, 6, 8, 12, 16)


def linear(
    draw, b, x: str, m: int, *, bias: bool | None = None, outlier_columns: bool = False, weight_scale: float = 1.0
) -> str:
    """x @ W (+ b): a MatMul over the last axis, as exporters write nn.Linear."""
    shape = b.shapes[x]
    k = shape[-1]
    w = b.weight((k, m), k) * np.float32(weight_scale)
    if outlier_columns and m > 1:
        # A few output columns much larger than the rest (what SmoothQuant finds in real layers).
        cols = b.rng.choice(m, size=max(1, m // 4), replace=False)
        factor = float(draw(st.sampled_from([8.0, 20.0])))
        w[:, cols] *= factor
        b.gain *= factor
    y = b.node("MatMul", [x, b.const(w, "mw")], shape[:-1] + (m,))
    if bias is None:
        bias = draw(st.booleans())
    if bias:
        vec = b.const(b.rng.normal(scale=0.1, size=m).astype(np.float32), "mb")
        # Either operand order: exporters write both.
        y = b.node("Add", [y, vec] if draw(st.booleans()) else [vec, y], shape[:-1] + (m,))
    return y


def siblings(draw, b, x: str) -> str:
    count = draw(st.integers(2, 4))
    if draw(st.booleans()):
        widths = [draw(st.integers(1, 12))] * count
    else:
        widths = [draw(st.integers(1, 12)) for _ in range(count)]
    outs = [linear(draw, b, x, m) for m in widths]
    if draw(st.integers(0, 2)) == 0:  # one sibling scaled by a constant (fold_matmul_scale after fusion)
        outs[0] = _scale(draw, b, outs[0])
    joins = ["Concat", "outputs"] + (["Add"] if len(set(widths)) == 1 else [])
    join = draw(st.sampled_from(joins))
    b.steps.append(f"{count} sibling MatMuls {widths} joined by {join}")
    shape = b.shapes[outs[0]]
    if join == "Add":
        y = outs[0]
        for other in outs[1:]:
            y = b.node("Add", [y, other], shape)
        return y
    if join == "outputs":  # every sibling a graph output, the last one goes on
        b.outputs.extend(outs[:-1])
        return outs[-1]
    return b.node("Concat", outs, shape[:-1] + (sum(widths),), axis=len(shape) - 1)


def _scale(draw, b, y: str) -> str:
    """y · c or y / c for a constant c of one element, of either sign."""
    shape = b.shapes[y]
    op = draw(st.sampled_from(["Mul", "Div"]))
    c = float(draw(st.sampled_from([0.125, 0.35, 0.5, 2.0, 3.0, -0.5, -2.0])))
    # A scalar, or one element of the output's rank (a higher rank would broadcast to another shape).
    cshape = draw(st.sampled_from([(), (), (1,), (1,) * len(shape)]))
    const = b.const(np.full(cshape, c, np.float32), "scale")
    inputs = [const, y] if op == "Mul" and draw(st.booleans()) else [y, const]
    b.steps.append(f"{op}({c}, shape={cshape})")
    return b.node(op, inputs, shape)


def scaled_matmul(draw, b, x: str) -> str:
    width = draw(st.integers(1, 12)) if len(b.shapes[x]) == 2 else b.shapes[x][-1]
    y = linear(draw, b, x, width, bias=draw(st.booleans()))
    scaled = _scale(draw, b, y)
    other = draw(st.sampled_from(["none", "none", "relu", "output"]))
    b.steps.append(f"scaled MatMul (other reader: {other})")
    if other == "relu":  # the MatMul's output has a second reader: not the scale's alone
        return b.node("Add", [scaled, b.node("Relu", [y], b.shapes[y])], b.shapes[y])
    if other == "output":
        b.outputs.append(y)
    return scaled


def layer_norm(draw, b, x: str) -> str:
    d = b.shapes[x][-1]
    if d < 4:
        # Over 2 features LayerNorm is sign(x₀ − x₁)·γ + β: a row whose two values lie within one
        # int8 step flips, under any quantizer (one row of 24 flipping gave 8 dB: fuzz finding 1d).
        return x
    gamma = b.rng.uniform(0.5, 1.5, d)
    outliers = draw(st.booleans())
    b.gain = 1.0
    if outliers and d > 1:
        b.gain = float(draw(st.sampled_from([10.0, 30.0])))
        gamma[b.rng.choice(d, size=max(1, d // 6), replace=False)] *= b.gain
    beta = b.rng.normal(scale=0.1, size=d)
    b.steps.append(f"LayerNormalization(outliers={outliers})")
    return b.node(
        "LayerNormalization", [x, b.const(gamma.astype(np.float32), "ln"), b.const(beta.astype(np.float32), "ln")],
        b.shapes[x], axis=-1, epsilon=1e-5,
    )


def outlier_mul(draw, b, x: str) -> str:
    d = b.shapes[x][-1]
    scale = b.rng.uniform(0.5, 1.5, d)
    factor = float(draw(st.sampled_from([10.0, 30.0])))
    scale[b.rng.choice(d, size=max(1, d // 6), replace=False)] *= factor
    b.gain *= factor
    b.steps.append("Mul(outlier channels)")
    return b.node("Mul", [x, b.const(scale.astype(np.float32), "outl")], b.shapes[x])


def _heads_shape(draw, b, x: str, tail: tuple[int, ...]) -> str:
    """A Reshape target (0 or N, then -1 or S, then ``tail``): constant, or computed from Shape(x)."""
    s = b.shapes[x][1]
    if draw(st.booleans()):
        lead = draw(st.sampled_from([(0, s), (0, -1), (-1, s)] if -1 not in tail else [(0, s)]))
        return b.const(np.array([*lead, *tail], np.int64), "shape")
    # Shape → Gather(batch) → Concat with constants, as torch.onnx writes x.view(x.size(0), -1, H, D).
    shape = b.node("Shape", [x], (len(b.shapes[x]),))
    batch = b.node("Gather", [shape, b.const(np.array([0], np.int64), "idx")], (1,), axis=0)
    rest = (-1, *tail) if -1 not in tail else (s, *tail)
    return b.node("Concat", [batch, b.const(np.array(rest, np.int64), "shape")], (1 + len(rest),), axis=0)


def attention(draw, b, x: str) -> str:
    n, s, d = b.shapes[x]
    heads = draw(st.sampled_from([h for h in (1, 2, 4) if d % h == 0]))
    hd = d // heads
    bias = draw(st.booleans())
    gain = b.gain
    # Scores of order 1 whatever the outliers of x: hundreds make softmax an argmax whose choice
    # flips under any int8 noise (fuzz finding 1e).
    q, k = (linear(draw, b, x, d, bias=bias, weight_scale=1.0 / gain) for _ in range(2))
    v = linear(draw, b, x, d, bias=bias, outlier_columns=draw(st.booleans()))

    def split_heads(t: str, perm: list[int]) -> str:
        shaped = b.node("Reshape", [t, _heads_shape(draw, b, t, (heads, hd))], (n, s, heads, hd))
        return b.node("Transpose", [shaped], tuple((n, s, heads, hd)[i] for i in perm), perm=perm)

    q = split_heads(q, [0, 2, 1, 3])
    k = split_heads(k, [0, 2, 3, 1])  # kᵀ directly, as exporters write it
    v = split_heads(v, [0, 2, 1, 3])
    scores = b.node("MatMul", [q, k], (n, heads, s, s))
    op = draw(st.sampled_from(["Mul", "Div"]))
    sign = draw(st.sampled_from([1.0, 1.0, 1.0, -1.0]))
    c = sign * (1.0 / np.sqrt(hd) if op == "Mul" else np.sqrt(hd))
    scores = b.node(op, [scores, b.const(np.array(c, np.float32), "scale")], (n, heads, s, s))
    mask = draw(st.sampled_from(["none", "causal", "causal-large"]))
    if mask != "none":
        fill = -4.0 if mask == "causal" else -10000.0
        causal = np.triu(np.full((s, s), fill, np.float32), k=1)
        scores = b.node("Add", [scores, b.const(causal, "mask")], (n, heads, s, s))
    probs = b.node("Softmax", [scores], (n, heads, s, s), axis=-1)
    ctx = b.node("MatMul", [probs, v], (n, heads, s, hd))
    ctx = b.node("Transpose", [ctx], (n, s, heads, hd), perm=[0, 2, 1, 3])
    ctx = b.node("Reshape", [ctx, _heads_shape(draw, b, ctx, (d,))], (n, s, d))
    out = linear(draw, b, ctx, d)
    residual = draw(st.booleans())
    b.steps.append(f"attention(heads={heads}, {op} {c:.3f}, mask={mask}, residual={residual})")
    return b.node("Add", [x, out], (n, s, d)) if residual else out


def feed_forward(draw, b, x: str) -> str:
    d = b.shapes[x][-1]
    hidden = draw(st.sampled_from([d, 2 * d]))
    h = linear(draw, b, x, hidden)
    act = draw(st.sampled_from(["Relu", "Sigmoid", "Tanh", "gelu"]))
    if act == "gelu":  # the sigmoid approximation x·σ(1.702x): Gelu is opset 20
        k = b.node("Mul", [h, b.const(np.array(1.702, np.float32), "g")], b.shapes[h])
        h = b.node("Mul", [h, b.node("Sigmoid", [k], b.shapes[h])], b.shapes[h])
    else:
        h = b.node(act, [h], b.shapes[h])
    y = linear(draw, b, h, d)
    residual = draw(st.booleans())
    b.steps.append(f"feed-forward({hidden}, {act}, residual={residual})")
    return b.node("Add", [x, y], b.shapes[x]) if residual else y


def activation(draw, b, x: str) -> str:
    op = draw(st.sampled_from(["Relu", "Sigmoid", "Tanh"]))
    b.steps.append(op)
    return b.node(op, [x], b.shapes[x])


def mean_tokens(draw, b, x: str) -> str:
    n, _, d = b.shapes[x]
    b.steps.append("ReduceMean(tokens) to 2-D")
    return b.node("ReduceMean", [x], (n, d), axes=[1], keepdims=0)


STEPS_3D = {
    "siblings": (siblings, 3),
    "attention": (attention, 3),
    "scaled_matmul": (scaled_matmul, 2),
    "layer_norm": (layer_norm, 2),
    "outlier_mul": (outlier_mul, 1),
    "feed_forward": (feed_forward, 2),
    "activation": (activation, 1),
    "to_2d": (mean_tokens, 1),
}
