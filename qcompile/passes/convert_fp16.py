"""ConvertFloat16Pass: run the float parts of a model in fp16, keeping fp32 where fp16 would fail.

Rule, node by node:

- A node runs in fp16 when its op is in ``FP16_INPUTS`` (ops whose fp16 form keeps the math: conv,
  matmul, elementwise, pooling, data movement, common activations), it is not in the profile's
  ``keep_fp32_ops``, every float tensor it reads or writes is float32, and calibration saw no value of
  those tensors beyond ``overflow_limit`` in magnitude. fp16's largest finite value is 65504, so a
  tensor with max |x| above the limit would become ±inf; the node and its neighbours' casts keep it
  in fp32 instead.
- Its float32 outputs become fp16, and so do the inputs ``FP16_INPUTS`` names (Resize's ``scales``
  and ``roi`` stay float32 per the ONNX spec; shape and index inputs are never float). Constant
  inputs are stored as fp16 initializers (a copy when an fp32 node also reads the constant), halving
  the file's weights. A constant with a value beyond fp16's range keeps its node in fp32.
- Where an fp16 tensor meets an fp32 reader (or an fp32 tensor an fp16 reader), one Cast per tensor
  and direction is inserted and shared by the readers. Graph inputs and outputs keep float32: the
  model's interface does not change.

Why fp16 and not int8 for onnxruntime's CUDA provider: it has int8 kernels for few ops, and Q/DQ
models measured slower than float there (``qcompile/targets.py``).

``max_abs``: tensor name → the largest |x| calibration saw (graph inputs and node outputs). A tensor
missing from it (never observed) is treated as fitting; calibration observes every float tensor.
"""

from __future__ import annotations

import fnmatch
from collections import Counter
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from qcompile.graph.names import FreshNames
from qcompile.graph.notes import add_note
from qcompile.graph.queries import constant_array

FP16_MAX = 65504.0
ALL = None  # every float input

# Op type → indices of the inputs that take the fp16 type (ALL: every float input).
FP16_INPUTS: dict[str, tuple[int, ...] | None] = {
    **{op: ALL for op in (
        "Conv", "ConvTranspose", "Gemm", "MatMul", "Add", "Sub", "Mul", "Max", "Min", "Neg", "Abs",
        "Relu", "LeakyRelu", "PRelu", "Clip", "Sigmoid", "HardSigmoid", "HardSwish", "Tanh", "Gelu",
        "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "BatchNormalization",
        "Concat", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Slice", "Split",
        "Gather", "Identity", "Pad", "Expand", "Tile", "Where", "DepthToSpace", "SpaceToDepth", "Erf",
        # By a constant only (a computed divisor stays fp32: see ConvertFloat16Pass._fp32_reason).
        "Div",
    )},
    "Resize": (0,),
    "Upsample": (0,),
}

# node.meta[PRECISION_KEY]: (kind, words), kind FP16 or one of the reasons a node stays fp32.
PRECISION_KEY = "qcompile.precision"
# Ops that take any float type and whose output type does not follow it: their float input is read
# as it comes (fp16 or fp32), so they never need a Cast.
ANY_FLOAT_INPUT = frozenset({"Shape", "Size", "Cast"})
FP16, NO_FLOAT, NO_RULE, SENSITIVE, OVERFLOW = "fp16", "no_float", "no_rule", "sensitive", "overflow"


class ConvertFloat16Pass(ir.passes.InPlacePass):
    def __init__(
        self,
        max_abs: Mapping[str, float],
        keep_fp32_ops: tuple[str, ...] = (),
        overflow_limit: float = 32000.0,
        keep_float: tuple[str, ...] = (),
    ) -> None:
        super().__init__()
        if not 0 < overflow_limit <= FP16_MAX:
            raise ValueError(f"overflow_limit must be in (0, {FP16_MAX}], got {overflow_limit}")
        self.max_abs = max_abs
        self.keep_fp32_ops = frozenset(keep_fp32_ops)
        self.overflow_limit = overflow_limit
        # The user's keep_float (op types, node names, fnmatch patterns) keeps nodes in fp32.
        self.keep_float = tuple(keep_float)

    # -- decisions ---------------------------------------------------------------------------

    def _fp32_reason(self, node: ir.Node) -> tuple[str, str] | None:
        """(kind, words) of why ``node`` stays fp32, or None: it runs in fp16.

        kind is one of NO_FLOAT (nothing to convert), NO_RULE, SENSITIVE, OVERFLOW.
        """
        floats = [v for v in (*node.inputs, *node.outputs) if v is not None and v.dtype in _FLOATS]
        if not floats or any(v.dtype != ir.DataType.FLOAT for v in floats) or _any_float_input(node):
            return NO_FLOAT, "computes no float32 tensor"
        for pattern in self.keep_float:
            if pattern == node.op_type or (node.name and fnmatch.fnmatchcase(node.name, pattern)):
                return SENSITIVE, f"kept fp32 by keep_float {pattern!r}"
        if node.op_type in self.keep_fp32_ops:
            return SENSITIVE, "numerically sensitive: kept fp32 by the target profile"
        if node.domain not in ("", "ai.onnx") or node.op_type not in FP16_INPUTS:
            return NO_RULE, f"no fp16 rule for {node.op_type}"
        divisor = node.inputs[1] if node.op_type == "Div" and len(node.inputs) > 1 else None
        if divisor is not None:
            data = constant_array(divisor)
            if data is None:
                return SENSITIVE, "divides by a computed tensor (one that rounds to 0 in fp16 gives inf)"
            if np.any((data != 0) & (data.astype(np.float16) == 0)):
                return SENSITIVE, "its constant divisor rounds to 0 in fp16"
        for value in floats:
            data = constant_array(value)
            peak = float(np.max(np.abs(data))) if data is not None and data.size else self.max_abs.get(value.name, 0.0)
            limit = FP16_MAX if data is not None else self.overflow_limit
            if not np.isfinite(peak) or peak > limit:
                return OVERFLOW, f"|{value.name}| reaches {peak:.4g} (fp16 overflows above {FP16_MAX:g}; limit {limit:g})"
        return None

    # -- the pass ---------------------------------------------------------------------------

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        self._fresh = FreshNames(graph)
        fp16_nodes: set[ir.Node] = set()
        kept: Counter = Counter()
        for node in graph:
            decision = self._fp32_reason(node)
            node.meta[PRECISION_KEY] = decision or (FP16, "")
            if decision is None:
                fp16_nodes.add(node)
                continue
            kind, words = decision
            if kind == OVERFLOW:
                add_note(model, f"{node.name}: kept fp32: {words}")
                words = "calibrated values overflow fp16"
            if kind != NO_FLOAT:
                kept[(node.op_type, words)] += 1
        if not fp16_nodes:
            add_note(model, "no node can run in fp16")
            return ir.passes.PassResult(model, modified=False)

        # Snapshot which inputs each fp16 node converts, before any value changes type.
        converted = {node: _converted_inputs(node) for node in fp16_nodes}
        for node in fp16_nodes:
            for out in node.outputs:
                if out.dtype == ir.DataType.FLOAT:
                    out.dtype = ir.DataType.FLOAT16
        fp16_constants: dict[str, ir.Value] = {}
        casts: dict[tuple[str, ir.DataType], ir.Value] = {}
        for node in list(graph):
            if _any_float_input(node):
                continue
            for index, value in enumerate(list(node.inputs)):
                if value is None or value.dtype not in _FLOATS:
                    continue
                wants = ir.DataType.FLOAT16 if node in fp16_nodes and index in converted[node] else ir.DataType.FLOAT
                if value.dtype == wants:
                    continue
                if wants == ir.DataType.FLOAT16 and constant_array(value) is not None:
                    replacement = self._fp16_constant(graph, value, fp16_constants)
                else:
                    replacement = self._cast(graph, value, wants, casts)
                node.replace_input_with(index, replacement)
        outputs_cast = self._restore_float_outputs(graph)
        for (op, reason), count in sorted(kept.items()):
            add_note(model, f"kept fp32: {op}×{count}: {reason}")
        add_note(model, f"{len(fp16_nodes)} nodes run in fp16; {len(casts) + outputs_cast} Cast nodes at fp16/fp32 boundaries")
        return ir.passes.PassResult(model, modified=True)

    def _fp16_constant(self, graph: ir.Graph, value: ir.Value, cache: dict[str, ir.Value]) -> ir.Value:
        if value.name not in cache:
            array = constant_array(value).astype(np.float16)
            if len(value.uses()) == 1 and value.is_initializer() and not value.is_graph_output():
                value.const_value = ir.tensor(array, name=value.name)
                value.dtype = ir.DataType.FLOAT16
                cache[value.name] = value
            else:  # an fp32 reader shares it: keep the float32 copy for that reader
                copy = ir.Value(name=self._fresh(f"{value.name}_fp16"), const_value=ir.tensor(array))
                copy.dtype, copy.shape = ir.DataType.FLOAT16, value.shape
                graph.register_initializer(copy)
                cache[value.name] = copy
        return cache[value.name]

    def _cast(self, graph: ir.Graph, value: ir.Value, to: ir.DataType, cache: dict) -> ir.Value:
        key = (value.name, to)
        if key not in cache:
            suffix = "fp16" if to == ir.DataType.FLOAT16 else "fp32"
            cast = ir.node(
                "Cast",
                [value],
                attributes={"to": to},
                outputs=[ir.Value(name=self._fresh(f"{value.name}_{suffix}"))],
                name=self._fresh(f"{value.name}_Cast_{suffix}"),
            )
            cast.outputs[0].dtype, cast.outputs[0].shape = to, value.shape
            producer = value.producer()
            if producer is None:
                graph.insert_before(graph.node(0), cast)
            else:
                graph.insert_after(producer, cast)
            cache[key] = cast.outputs[0]
        return cache[key]

    def _restore_float_outputs(self, graph: ir.Graph) -> int:
        """A graph output made fp16 keeps its name and float32 type through a final Cast."""
        count = 0
        for index, value in enumerate(list(graph.outputs)):
            if value.dtype != ir.DataType.FLOAT16:
                continue
            name = value.name
            value.name = self._fresh(f"{name}_fp16")
            cast = ir.node("Cast", [value], attributes={"to": ir.DataType.FLOAT},
                           outputs=[ir.Value(name=name)], name=self._fresh(f"{name}_Cast_fp32"))
            cast.outputs[0].dtype, cast.outputs[0].shape = ir.DataType.FLOAT, value.shape
            graph.insert_after(value.producer(), cast)
            graph.outputs[index] = cast.outputs[0]
            count += 1
        return count


_FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16)


def _any_float_input(node: ir.Node) -> bool:
    return node.domain in ("", "ai.onnx") and node.op_type in ANY_FLOAT_INPUT


def _converted_inputs(node: ir.Node) -> frozenset[int]:
    indices = FP16_INPUTS[node.op_type]
    if indices is ALL:
        indices = range(len(node.inputs))
    return frozenset(i for i in indices if i < len(node.inputs) and node.inputs[i] is not None
                     and node.inputs[i].dtype == ir.DataType.FLOAT)


def precision_summary(model: ir.Model) -> dict[str, int]:
    """Nodes by precision after the pass: "fp16", and "fp32" for the rest that compute floats."""
    counts: Counter = Counter()
    for node in model.graph:
        kind, _ = node.meta.get(PRECISION_KEY, (NO_FLOAT, ""))
        if kind != NO_FLOAT:
            counts["fp16" if kind == FP16 else "fp32"] += 1
    return dict(counts)
