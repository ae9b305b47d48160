"""A hypothesis strategy for random small valid ONNX graphs over the ops of the op table.

``fuzz_models()`` draws a float32 NCHW input (batch symbolic ``N``, 1-4 channels, 3-10 pixels a
side) and then a chain of steps, each applying one op or a small block to the current tensor:

- compute: Conv (random groups, kernels, strides, pads, dilations, optional bias, sometimes an
  all-zero output channel), ConvTranspose, Gemm (transB, alpha, beta), MatMul + Add bias; each may
  be followed by BatchNormalization (folded), and BatchNormalization also appears on its own
  (decomposed);
- elementwise: Add/Mul with a constant (scalar, per channel or full) or between two branches;
- pooling: MaxPool, AveragePool, GlobalAveragePool;
- activations: Relu, Clip, Sigmoid, HardSigmoid, LeakyRelu;
- data movement: Reshape, Transpose, Flatten, Squeeze/Unsqueeze, Slice, Split (+ Concat), Resize;
- blocks: residual (x + Conv(Relu(Conv x))), two branches joined by Add or Concat, squeeze-excite
  (x · Sigmoid(Conv(GAP x))), one weight initializer shared by two Convs; Dropout anywhere.

The graph is 4-D until a step flattens it to (N, features); 2-D steps may go back to 4-D through
Unsqueeze. 2-D steps also include several MatMuls reading one tensor and a MatMul scaled by a
constant. A quarter of the models are transformer-like instead: a (N, S, D) input and the steps of
``sequence_steps.py`` (sibling MatMuls, attention blocks, scaled MatMuls, LayerNormalization and
outlier channels), which reach the MatMul passes (SmoothQuant, dynamic quantization, sibling fusion,
scale folding). Weights come from a numpy generator seeded by a drawn seed, scaled by 1/sqrt(fan-in)
so activations stay of order 1, as in a trained net. Shapes are tracked here with the ONNX shape
formulas and declared on the outputs; onnx's strict shape inference and full checker must accept
the result, and the fuzz test first runs it in onnxruntime.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from tests.fuzz import sequence_steps

OPSET = 17
BATCH = "N"
MAX_SIDE = 16
MAX_CHANNELS = 8


@dataclass
class FuzzModel:
    proto: onnx.ModelProto
    input_shape: tuple[int, ...]  # without the batch axis
    steps: list[str] = field(default_factory=list)

    def __repr__(self) -> str:
        # What hypothesis prints for a failing example: the steps and the graph (weights are seeded).
        return f"FuzzModel(steps={self.steps})\n{onnx.printer.to_text(self.proto.graph)}"

    def _repr_pretty_(self, printer, cycle) -> None:  # hypothesis prints examples with this
        printer.text(repr(self))


class _Builder:
    """Appends nodes and initializers; every tensor's shape is kept with the batch axis as -1."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.conv_weights: dict[tuple, str] = {}  # (weight shape, group) -> initializer, for sharing
        self.steps: list[str] = []
        self.outputs: list[str] = []  # extra graph outputs a step makes (the current tensor is added at the end)
        # How far the sequence steps' outlier channels may have grown the current tensor (attention
        # divides its query/key weights by it: scores stay of order 1, as in a trained model).
        self.gain = 1.0
        self._count = 0

    def name(self, prefix: str) -> str:
        self._count += 1
        return f"{prefix}{self._count}"

    def const(self, array: np.ndarray, prefix: str = "c") -> str:
        name = self.name(prefix)
        self.initializers.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def weight(self, shape: tuple[int, ...], fan_in: int, zero_channel: bool = False) -> np.ndarray:
        w = self.rng.normal(size=shape) / math.sqrt(max(fan_in, 1))
        if zero_channel and shape[0] > 1:
            w[self.rng.integers(shape[0])] = 0.0  # a dead output channel: its per-channel range is 0
        return w.astype(np.float32)

    def node(self, op: str, inputs: list[str], shape: tuple[int, ...], n_outputs: int = 1, **attrs) -> str:
        outputs = [self.name(op.lower()) for _ in range(n_outputs)]
        self.nodes.append(helper.make_node(op, inputs, outputs, name=self.name(f"n_{op}_"), **attrs))
        self.shapes[outputs[0]] = shape
        return outputs[0]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _conv_out(size: int, k: int, s: int, p0: int, p1: int, d: int) -> int:
    return (size + p0 + p1 - d * (k - 1) - 1) // s + 1


# ---- 4-D steps: each takes (draw, builder, tensor) and returns the new current tensor -------------


def _conv(draw, b: _Builder, x: str, *, keep_shape: bool = False, out_channels: int | None = None) -> str:
    n, c, h, w = b.shapes[x]
    group = draw(st.sampled_from(_divisors(c)))
    if out_channels is None:
        out_channels = draw(st.sampled_from([m * group for m in range(1, 4) if m * group <= MAX_CHANNELS] or [group]))
    elif out_channels % group:
        group = 1
    if keep_shape:
        k, stride, dil = draw(st.sampled_from([1, 3])), 1, 1
        kh = kw = k
        pads = [k // 2] * 4
    else:
        kh = draw(st.integers(1, min(3, h + 2)))
        kw = draw(st.integers(1, min(3, w + 2)))
        stride = draw(st.sampled_from([1, 1, 2]))
        dil = draw(st.sampled_from([1, 1, 2]))
        pads = [draw(st.integers(0, 1)) for _ in range(4)]
    oh = _conv_out(h, kh, stride, pads[0], pads[2], dil)
    ow = _conv_out(w, kw, stride, pads[1], pads[3], dil)
    if oh < 1 or ow < 1:
        dil, pads, kh, kw, stride = 1, [0, 0, 0, 0], 1, 1, 1
        oh, ow = h, w
    wshape = (out_channels, c // group, kh, kw)
    shared = b.conv_weights.get((wshape, group))
    if shared is not None and draw(st.booleans()):
        wname = shared
        b.steps.append("shared-weight")
    else:
        zero = draw(st.integers(0, 9)) == 0
        wname = b.const(b.weight(wshape, (c // group) * kh * kw, zero_channel=zero), "w")
        b.conv_weights.setdefault((wshape, group), wname)
    inputs = [x, wname]
    if draw(st.booleans()):
        inputs.append(b.const(b.rng.normal(scale=0.1, size=out_channels).astype(np.float32), "bias"))
    b.steps.append(f"Conv(k={kh}x{kw},s={stride},d={dil},g={group},p={pads})")
    return b.node(
        "Conv", inputs, (n, out_channels, oh, ow),
        kernel_shape=[kh, kw], strides=[stride, stride], dilations=[dil, dil], pads=pads, group=group,
    )


def _conv_transpose(draw, b: _Builder, x: str) -> str:
    n, c, h, w = b.shapes[x]
    group = draw(st.sampled_from(_divisors(c)))
    out_channels = group * draw(st.integers(1, max(1, MAX_CHANNELS // (2 * group))))
    k = draw(st.integers(1, 3))
    stride = draw(st.sampled_from([1, 2])) if max(h, w) * 2 + k <= MAX_SIDE else 1
    pad = draw(st.integers(0, (k - 1) // 2))  # keeps the output at least 1 wide
    oh, ow = stride * (h - 1) + k - 2 * pad, stride * (w - 1) + k - 2 * pad
    inputs = [x, b.const(b.weight((c, out_channels // group, k, k), c * k * k // group), "wt")]
    if draw(st.booleans()):
        inputs.append(b.const(b.rng.normal(scale=0.1, size=out_channels).astype(np.float32), "bias"))
    b.steps.append(f"ConvTranspose(k={k},s={stride},g={group},p={pad})")
    return b.node(
        "ConvTranspose", inputs, (n, out_channels, oh, ow),
        kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4, group=group,
    )


def _batchnorm(draw, b: _Builder, x: str) -> str:
    c = b.shapes[x][1]
    rng = b.rng
    params = [
        rng.uniform(0.5, 2.0, c),  # scale
        rng.normal(scale=0.5, size=c),  # bias
        rng.normal(scale=0.5, size=c),  # mean
        rng.uniform(0.5, 2.0, c),  # var
    ]
    names = [b.const(p.astype(np.float32), "bn") for p in params]
    b.steps.append("BatchNormalization")
    return b.node("BatchNormalization", [x, *names], b.shapes[x], epsilon=1e-5)


def _dropout(draw, b: _Builder, x: str) -> str:
    form = draw(st.sampled_from(["plain", "ratio", "ratio+training", "mask"]))
    inputs = [x]
    if form != "plain":
        inputs.append(b.const(np.array(0.3, np.float32), "ratio"))
    if form == "ratio+training":
        inputs.append(b.const(np.array(False), "training"))
    b.steps.append(f"Dropout({form})")
    return b.node("Dropout", inputs, b.shapes[x], n_outputs=2 if form == "mask" else 1)


def _activation(draw, b: _Builder, x: str) -> str:
    op = draw(st.sampled_from(["Relu", "Clip", "Sigmoid", "HardSigmoid", "LeakyRelu"]))
    b.steps.append(op)
    if op == "Clip":
        lo, hi = draw(st.sampled_from([(0.0, 6.0), (-1.0, 1.0), (0.0, None), (None, 0.5)]))
        inputs = [x, b.const(np.array(lo, np.float32)) if lo is not None else ""]
        if hi is not None:
            inputs.append(b.const(np.array(hi, np.float32)))
        return b.node("Clip", inputs, b.shapes[x])
    if op == "HardSigmoid":
        return b.node(op, [x], b.shapes[x], alpha=draw(st.sampled_from([0.2, 1.0 / 6])), beta=0.5)
    if op == "LeakyRelu":
        return b.node(op, [x], b.shapes[x], alpha=draw(st.sampled_from([0.01, 0.1, 0.3])))
    return b.node(op, [x], b.shapes[x])


def _elementwise_const(draw, b: _Builder, x: str) -> str:
    shape = b.shapes[x]
    op = draw(st.sampled_from(["Add", "Mul"]))
    kind = draw(st.sampled_from(["scalar", "channel", "full"]))
    if kind == "scalar":
        cshape: tuple[int, ...] = ()
    elif kind == "channel":
        cshape = (shape[1],) + (1,) * (len(shape) - 2)
    else:
        cshape = shape[1:]
    values = b.rng.normal(size=cshape) if op == "Add" else b.rng.uniform(0.25, 2.0, size=cshape)
    if op == "Mul" and draw(st.booleans()):
        values = -values
    b.steps.append(f"{op}(const {kind})")
    return b.node(op, [x, b.const(np.asarray(values, np.float32))], shape)


def _pool(draw, b: _Builder, x: str) -> str:
    n, c, h, w = b.shapes[x]
    op = draw(st.sampled_from(["MaxPool", "AveragePool", "GlobalAveragePool"]))
    if op == "GlobalAveragePool":
        b.steps.append(op)
        return b.node(op, [x], (n, c, 1, 1))
    k = draw(st.integers(1, max(1, min(3, h, w))))
    stride = draw(st.integers(1, 2))
    pad = draw(st.integers(0, (k - 1) // 2))  # pads must be smaller than the kernel
    oh, ow = _conv_out(h, k, stride, pad, pad, 1), _conv_out(w, k, stride, pad, pad, 1)
    attrs = dict(kernel_shape=[k, k], strides=[stride, stride], pads=[pad] * 4)
    if op == "AveragePool":
        attrs["count_include_pad"] = draw(st.integers(0, 1))
    b.steps.append(f"{op}(k={k},s={stride},p={pad})")
    return b.node(op, [x], (n, c, oh, ow), **attrs)


def _reshape4(draw, b: _Builder, x: str) -> str:
    n, c, h, w = b.shapes[x]
    target = draw(st.sampled_from([(c, w, h), (c, h * w, 1), (1, c * h, w), (c * h, 1, w)]))
    b.steps.append(f"Reshape{target}")
    return b.node("Reshape", [x, b.const(np.array((0, *target), np.int64), "shape")], (n, *target))


def _transpose4(draw, b: _Builder, x: str) -> str:
    perm = [0] + list(draw(st.permutations([1, 2, 3])))
    shape = b.shapes[x]
    b.steps.append(f"Transpose{perm}")
    return b.node("Transpose", [x], tuple(shape[i] for i in perm), perm=perm)


def _slice4(draw, b: _Builder, x: str) -> str:
    shape = b.shapes[x]
    axis = draw(st.integers(1, 3))
    size = shape[axis]
    if size < 2:
        return x
    start = draw(st.integers(0, size - 1))
    end = draw(st.integers(start + 1, size))
    step = draw(st.sampled_from([1, 1, 2]))
    new = list(shape)
    new[axis] = len(range(start, end, step))
    b.steps.append(f"Slice(axis={axis},{start}:{end}:{step})")
    consts = [b.const(np.array([v], np.int64), "sl") for v in (start, end, axis, step)]
    return b.node("Slice", [x, *consts], tuple(new))


def _split_concat(draw, b: _Builder, x: str) -> str:
    shape = b.shapes[x]
    axis = draw(st.integers(1, len(shape) - 1))
    if shape[axis] < 2:
        return x
    first = draw(st.integers(1, shape[axis] - 1))
    sizes = [first, shape[axis] - first]
    outs = [b.name("split") for _ in sizes]
    b.nodes.append(
        helper.make_node("Split", [x, b.const(np.array(sizes, np.int64), "sizes")], outs, name=b.name("n_Split_"), axis=axis)
    )
    for out, size in zip(outs, sizes):
        part = list(shape)
        part[axis] = size
        b.shapes[out] = tuple(part)
    # Rejoin in swapped order (a real permutation of the data), sometimes after an op on one part.
    if draw(st.booleans()):
        outs[0] = _activation(draw, b, outs[0])
    b.steps.append(f"Split(axis={axis},{sizes})+Concat")
    return b.node("Concat", [outs[1], outs[0]], shape, axis=axis)


def _squeeze_unsqueeze(draw, b: _Builder, x: str) -> str:
    shape = b.shapes[x]
    axis = draw(st.integers(1, len(shape)))
    grown = shape[:axis] + (1,) + shape[axis:]
    up = b.node("Unsqueeze", [x, b.const(np.array([axis], np.int64), "axes")], grown)
    b.steps.append(f"Unsqueeze+Squeeze(axis={axis})")
    return b.node("Squeeze", [up, b.const(np.array([axis], np.int64), "axes")], shape)


def _resize(draw, b: _Builder, x: str) -> str:
    n, c, h, w = b.shapes[x]
    # onnxruntime's optimizer pushes a Transpose through a linear Resize and then refuses the
    # scales it made (a float model it cannot load): linear only while the layout is NCHW.
    transposed = any(step.startswith("Transpose") for step in b.steps)
    mode = draw(st.sampled_from(["nearest"] if transposed else ["nearest", "linear"]))
    if 2 * max(h, w) <= MAX_SIDE and draw(st.booleans()):
        scales = b.const(np.array([1, 1, 2, 2], np.float32), "scales")
        b.steps.append(f"Resize(x2,{mode})")
        return b.node("Resize", [x, "", scales], (n, c, 2 * h, 2 * w), mode=mode)
    # Downscale by scales (sizes would fix the batch dimension): output = floor(side * 0.5).
    oh, ow = h // 2, w // 2
    if min(oh, ow) < 1:
        return x
    scales = b.const(np.array([1, 1, 0.5, 0.5], np.float32), "scales")
    b.steps.append(f"Resize(x0.5,{mode})")
    return b.node("Resize", [x, "", scales], (n, c, oh, ow), mode=mode)


def _residual(draw, b: _Builder, x: str) -> str:
    c = b.shapes[x][1]
    y = _conv(draw, b, x, keep_shape=True, out_channels=c)
    y = b.node("Relu", [y], b.shapes[y])
    y = _conv(draw, b, y, keep_shape=True, out_channels=c)
    b.steps.append("residual Add")
    return b.node("Add", [x, y], b.shapes[x])


def _branches(draw, b: _Builder, x: str) -> str:
    join = draw(st.sampled_from(["Add", "Concat", "Mul"]))
    c = b.shapes[x][1]
    outs = []
    for _ in range(2):
        width = c if join != "Concat" else draw(st.integers(1, MAX_CHANNELS // 2))
        y = _conv(draw, b, x, keep_shape=True, out_channels=width)
        if draw(st.booleans()):
            y = _activation(draw, b, y)
        outs.append(y)
    b.steps.append(f"branches joined by {join}")
    n, _, h, w = b.shapes[outs[0]]
    if join == "Concat":
        return b.node("Concat", outs, (n, sum(b.shapes[o][1] for o in outs), h, w), axis=1)
    return b.node(join, outs, b.shapes[outs[0]])


def _squeeze_excite(draw, b: _Builder, x: str) -> str:
    n, c, h, w = b.shapes[x]
    s = b.node("GlobalAveragePool", [x], (n, c, 1, 1))
    hidden = max(1, c // 2)
    s = b.node("Conv", [s, b.const(b.weight((hidden, c, 1, 1), c), "w")], (n, hidden, 1, 1))
    s = b.node("Relu", [s], (n, hidden, 1, 1))
    s = b.node("Conv", [s, b.const(b.weight((c, hidden, 1, 1), hidden), "w")], (n, c, 1, 1))
    s = b.node("Sigmoid", [s], (n, c, 1, 1))
    b.steps.append("squeeze-excite")
    return b.node("Mul", [x, s], (n, c, h, w))


def _to_2d(draw, b: _Builder, x: str) -> str:
    n, c, h, w = b.shapes[x]
    how = draw(st.sampled_from(["Flatten", "Reshape", "GAP+Flatten", "GAP+Squeeze"]))
    b.steps.append(how)
    if how == "Flatten":
        return b.node("Flatten", [x], (n, c * h * w), axis=1)
    if how == "Reshape":
        return b.node("Reshape", [x, b.const(np.array([0, -1], np.int64), "shape")], (n, c * h * w))
    pooled = b.node("GlobalAveragePool", [x], (n, c, 1, 1))
    if how == "GAP+Flatten":
        return b.node("Flatten", [pooled], (n, c), axis=1)
    return b.node("Squeeze", [pooled, b.const(np.array([2, 3], np.int64), "axes")], (n, c))


STEPS_4D = {
    "conv": (_conv, 5),
    "conv_transpose": (_conv_transpose, 1),
    "batchnorm": (_batchnorm, 1),
    "dropout": (_dropout, 1),
    "activation": (_activation, 3),
    "elementwise": (_elementwise_const, 2),
    "pool": (_pool, 2),
    "reshape": (_reshape4, 1),
    "transpose": (_transpose4, 1),
    "slice": (_slice4, 1),
    "split_concat": (_split_concat, 1),
    "squeeze_unsqueeze": (_squeeze_unsqueeze, 1),
    "resize": (_resize, 1),
    "residual": (_residual, 2),
    "branches": (_branches, 2),
    "squeeze_excite": (_squeeze_excite, 1),
}


# ---- 2-D steps ------------------------------------------------------------------------------------


def _gemm(draw, b: _Builder, x: str) -> str:
    n, k = b.shapes[x]
    m = draw(st.integers(1, 12))
    trans_b = draw(st.integers(0, 1))
    alpha = draw(st.sampled_from([1.0, 1.0, 0.5]))
    beta = draw(st.sampled_from([1.0, 1.0, 2.0]))
    wmat = b.weight((m, k), k)
    inputs = [x, b.const(wmat if trans_b else np.ascontiguousarray(wmat.T), "fw")]
    bias = draw(st.sampled_from(["none", "vector", "row"]))
    if bias != "none":
        vec = b.rng.normal(scale=0.1, size=m).astype(np.float32)
        inputs.append(b.const(vec if bias == "vector" else vec[None, :], "fb"))
    b.steps.append(f"Gemm(transB={trans_b},alpha={alpha},beta={beta},bias={bias})")
    return b.node("Gemm", inputs, (n, m), transB=trans_b, alpha=alpha, beta=beta)


def _matmul(draw, b: _Builder, x: str) -> str:
    n, k = b.shapes[x]
    m = draw(st.integers(1, 12))
    y = b.node("MatMul", [x, b.const(b.weight((k, m), k), "mw")], (n, m))
    b.steps.append("MatMul")
    if draw(st.booleans()):
        b.steps.append("Add(bias)")
        y = b.node("Add", [y, b.const(b.rng.normal(scale=0.1, size=m).astype(np.float32), "mb")], (n, m))
    return y


def _slice2(draw, b: _Builder, x: str) -> str:
    n, k = b.shapes[x]
    if k < 2:
        return x
    start = draw(st.integers(0, k - 1))
    end = draw(st.integers(start + 1, k))
    b.steps.append(f"Slice(axis=1,{start}:{end})")
    consts = [b.const(np.array([v], np.int64), "sl") for v in (start, end, 1)]
    return b.node("Slice", [x, *consts], (n, end - start))


def _back_to_4d(draw, b: _Builder, x: str) -> str:
    n, k = b.shapes[x]
    if k > MAX_CHANNELS * 4:
        return x
    b.steps.append("Unsqueeze to 4-D")
    return b.node("Unsqueeze", [x, b.const(np.array([2, 3], np.int64), "axes")], (n, k, 1, 1))


def _branches2(draw, b: _Builder, x: str) -> str:
    n, k = b.shapes[x]
    m = draw(st.integers(1, 8))
    outs = [b.node("Gemm", [x, b.const(b.weight((m, k), k), "fw"), b.const(np.zeros(m, np.float32), "fb")],
                   (n, m), transB=1) for _ in range(2)]
    join = draw(st.sampled_from(["Add", "Concat", "Mul"]))
    b.steps.append(f"two Gemms joined by {join}")
    if join == "Concat":
        return b.node("Concat", outs, (n, 2 * m), axis=1)
    return b.node(join, outs, (n, m))


STEPS_2D = {
    "gemm": (_gemm, 4),
    "matmul": (_matmul, 2),
    "batchnorm": (_batchnorm, 1),
    "dropout": (_dropout, 1),
    "activation": (_activation, 3),
    "elementwise": (_elementwise_const, 2),
    "slice": (_slice2, 1),
    "split_concat": (_split_concat, 1),
    "squeeze_unsqueeze": (_squeeze_unsqueeze, 1),
    "branches": (_branches2, 1),
    "to_4d": (_back_to_4d, 1),
    "siblings": (sequence_steps.siblings, 1),
    "scaled_matmul": (sequence_steps.scaled_matmul, 1),
}


def _weighted(table: dict) -> list[str]:
    return [name for name, (_, weight) in table.items() for _ in range(weight)]


@st.composite
def fuzz_models(draw, max_steps: int = 6, sequence: bool | None = None) -> FuzzModel:
    """``sequence``: True draws only transformer-like models, False only image-like, None both."""
    seed = draw(st.integers(0, 2**32 - 1))
    b = _Builder(np.random.default_rng(seed))
    # A quarter of the models are transformer-like: a (N, S, D) sequence and the steps of sequence_steps.
    if sequence if sequence is not None else draw(st.integers(0, 3)) == 0:
        input_shape: tuple[int, ...] = (draw(st.integers(1, 6)), draw(st.sampled_from(sequence_steps.SEQ_WIDTHS)))
    else:
        input_shape = (draw(st.integers(1, 4)), draw(st.integers(3, 10)), draw(st.integers(3, 10)))
    b.shapes["x"] = (-1, *input_shape)
    x = "x"
    outputs = b.outputs
    for _ in range(draw(st.integers(1, max_steps))):
        rank = len(b.shapes[x])
        table = {4: STEPS_4D, 3: sequence_steps.STEPS_3D, 2: STEPS_2D}[rank]
        step = draw(st.sampled_from(_weighted(table)))
        if rank == 4 and max(b.shapes[x][2:]) > MAX_SIDE:
            step = "pool"
        previous = x
        x = table[step][0](draw, b, x)
        if rank == 4 and draw(st.integers(0, 5)) == 0 and len(b.shapes[x]) == 4:
            x = _to_2d(draw, b, x)
        # Sometimes an intermediate tensor is a graph output too (and still read by later nodes).
        if x != previous and draw(st.integers(0, 7)) == 0:
            outputs.append(x)
    # Tensors are O(1) already; a trailing BatchNormalization after compute ops gets folded.
    if b.nodes and b.nodes[-1].op_type in ("Conv", "ConvTranspose", "Gemm", "MatMul") and draw(st.booleans()):
        x = _batchnorm(draw, b, x)
    if x == "x":  # every step declined: at least one op
        x = _activation(draw, b, x)
    if x not in outputs:
        outputs.append(x)
    # Sometimes a weight is a graph output too (a valid model; its DequantizeLinear must not take it).
    weights = [t for t in b.initializers if t.data_type == TensorProto.FLOAT and len(t.dims) >= 1]
    if weights and draw(st.integers(0, 7)) == 0:
        exported = weights[draw(st.integers(0, len(weights) - 1))]
        b.shapes[exported.name] = tuple(exported.dims)
        outputs.append(exported.name)
        b.steps.append(f"initializer {exported.name} as output")

    def value(name: str) -> onnx.ValueInfoProto:
        dims = [BATCH if d == -1 else d for d in b.shapes[name]]
        return helper.make_tensor_value_info(name, TensorProto.FLOAT, dims)

    graph = helper.make_graph(b.nodes, "fuzz", [value("x")], [value(o) for o in outputs], b.initializers)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=8)
    proto = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True)
    onnx.checker.check_model(proto, full_check=True)
    return FuzzModel(proto=proto, input_shape=input_shape, steps=b.steps)
