"""QuantizeInt4WeightsPass: blockwise int4 weights for chosen MatMuls.

Rule: a named MatMul whose second input B is a constant 2-D float32 weight of shape (K, N), and
whose node annotation kept it float (no Q/DQ around it), reads B through

    DequantizeLinear(B_q: int4 (K, N), scale: float32 (ceil(K / block_size), N), axis=0, block_size)

ONNX opset 21 added ``block_size`` to DequantizeLinear (blocked quantization: element (k, n) is
dequantized with ``scale[k // block_size, n]``) and the 4-bit types. The zero point is left out,
so it is 0 (symmetric), its default in the spec. Per block of ``block_size`` rows of one column:

    scale = r · max|w| / 7,    B_q = clip(round(w / scale), -8, 7)

with the clipping ratio r chosen from a small grid (1.0 down to 0.7) per block by the smallest
squared rounding + clipping error of the block's weights, which lowers the error of the weights
at no run-time cost (int4 has only 16 levels: the outermost value is often worth clipping).

onnxruntime's CPU graph optimizer fuses this DequantizeLinear → MatMul into its MatMulNBits
kernel (``block_size`` a power of two ≥ 16), which computes with the activations in float or, with
the session option ``session.qdq_matmulnbits_accuracy_level`` = 4 (its default), quantizes them to
int8 blockwise at run time. The activation input therefore stays float: a static Q/DQ on it would
not fuse.

Opset: a model below opset 21 is converted with onnxscript's version converter, within
``max_opset`` (a UsageError when ``max_opset`` < 21); the note says so.

Where onnxruntime will not fuse it (``matmulnbits_blocker``, from its QDQ selector in 1.32), int4
would make the model slower, not faster: the weight would be dequantized to float on every run and
the MatMul would run in float. So the pass declines those MatMuls (they stay float, as annotation
left them) with a note saying why. The selector looks at what reads the MatMul's output:

- a QuantizeLinear (the next op is int8): it only fuses DequantizeLinear → MatMul with no
  QuantizeLinear after it;
- a lone Relu or Clip (the output's only reader, itself read once and not a graph output): it takes
  the activation for one to fold into a QuantizeLinear after it, and drops the group when there is
  none. A Relu with two readers, or one that is a graph output, does not stop it;
- before that, its MatMul + Add fusion turns a MatMul with a 2-D input whose only reader is an Add
  (bias) into a Gemm, so the Add's readers are the ones that count.

K does not matter: a K below ``block_size`` (one short block) fuses as well.

Preconditions: annotation kept the named nodes float; run after PlaceQDQPass. Nodes that do not
qualify are declined with a note saying why.
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np
import onnx_ir as ir
from onnxscript import version_converter

from qcompile.errors import UsageError
from qcompile.graph.names import FreshNames
from qcompile.graph.notes import add_note
from qcompile.graph.queries import constant_array
from qcompile.quant.spec import DECISION_KEY, NodeDecision

# DequantizeLinear's block_size and the 4-bit types.
INT4_OPSET = 21
INT4_MIN, INT4_MAX = -8, 7
# Clipping ratios tried per block (the first is plain max|w|).
_CLIP_RATIOS = np.linspace(1.0, 0.7, 7, dtype=np.float32)


def quantize_blockwise_int4(weight: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int4 along axis 0 in blocks of ``block_size``: (int8 values in [-8, 7], scales).

    The scales have shape (ceil(K / block_size), N); the last block may be shorter.
    """
    k, n = weight.shape
    blocks = -(-k // block_size)
    padded = np.zeros((blocks * block_size, n), dtype=np.float32)
    padded[:k] = weight
    grouped = padded.reshape(blocks, block_size, n)
    amax = np.abs(grouped).max(axis=1)  # (blocks, n)
    best_scale = np.zeros_like(amax)
    best_error = np.full_like(amax, np.inf)
    for ratio in _CLIP_RATIOS:
        scale = np.where(amax > 0, amax * ratio / INT4_MAX, 1.0).astype(np.float32)
        q = np.clip(np.round(grouped / scale[:, None, :]), INT4_MIN, INT4_MAX)
        # Padding rows are zeros and quantize exactly: they add no error.
        error = ((q * scale[:, None, :] - grouped) ** 2).sum(axis=1)
        better = error < best_error
        best_error = np.where(better, error, best_error)
        best_scale = np.where(better, scale, best_scale)
    q = np.clip(np.round(grouped / best_scale[:, None, :]), INT4_MIN, INT4_MAX).astype(np.int8)
    return q.reshape(blocks * block_size, n)[:k], best_scale.astype(np.float32)


def _readers(value: ir.Value) -> list[ir.Node]:
    return [use.node for use in value.uses()]


def _fused_as_gemm(node: ir.Node, add: ir.Node) -> bool:
    """Whether onnxruntime's MatMul + Add fusion turns ``node`` and ``add`` into one Gemm: a 2-D
    input A, and a bias Gemm can broadcast (length N, or 2-D with one row or the output's shape)."""
    a = node.inputs[0]
    if node.op_type != "MatMul" or a is None or a.shape is None or len(a.shape) != 2:
        return False
    bias = next((v for v in add.inputs if v is not node.outputs[0]), None)
    if bias is None or bias.shape is None:
        return False
    if len(bias.shape) == 1:
        return True
    # An unknown output shape: assume it fits (declining int4 costs less than an unfused int4 MatMul).
    out_shape = node.outputs[0].shape
    return len(bias.shape) == 2 and (bias.shape[0] == 1 or out_shape is None or bias.shape == out_shape)


def matmulnbits_blocker(node: ir.Node) -> str | None:
    """Why onnxruntime (1.32, CPU) would not fuse DequantizeLinear(int4 weight) → ``node`` (a MatMul
    or Gemm) into MatMulNBits, in words for the report; None when nothing in the graph stops it.

    See the module docstring for the selector's rules this follows.
    """
    out = node.outputs[0]
    readers = _readers(out)
    after = "its output"
    if len(readers) == 1 and readers[0].op_type == "Add" and _fused_as_gemm(node, readers[0]):
        out = readers[0].outputs[0]
        readers = _readers(out)
        after = "its bias Add (onnxruntime fuses MatMul + Add into a Gemm first)"
    if any(r.op_type == "QuantizeLinear" for r in readers):
        return (
            f"{after} is quantized (a QuantizeLinear reads it); onnxruntime fuses an int4 weight into MatMulNBits "
            "only when no QuantizeLinear follows"
        )
    if len(readers) == 1 and readers[0].op_type in ("Relu", "Clip"):
        act = readers[0].outputs[0]
        if len(act.uses()) == 1 and not act.is_graph_output():
            return (
                f"{after} goes only into a {readers[0].op_type}; onnxruntime 1.32 takes that for an activation to "
                "fold into a QuantizeLinear and, finding none, skips the MatMulNBits fusion"
            )
    return None


def dequantize_blockwise(q: np.ndarray, scale: np.ndarray, block_size: int) -> np.ndarray:
    """The float weight DequantizeLinear(block_size) computes from ``q`` and ``scale`` (axis 0)."""
    return q.astype(np.float32) * np.repeat(scale, block_size, axis=0)[: q.shape[0]]


class QuantizeInt4WeightsPass(ir.passes.InPlacePass):
    def __init__(self, node_names: Collection[str], block_size: int = 32, max_opset: int | None = None) -> None:
        super().__init__()
        if block_size < 16 or block_size & (block_size - 1):
            raise UsageError(f"int4 block_size must be a power of two >= 16 (onnxruntime's MatMulNBits), got {block_size}")
        self.node_names = frozenset(node_names)
        self.block_size = block_size
        self.max_opset = max_opset

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        targets = [node for node in model.graph if node.name in self.node_names]
        chosen = []
        for node in targets:
            reason = self._decline_reason(node)
            if reason:
                add_note(model, f"int4 weights: {node.name} stays as it was: {reason}")
                decision = node.meta.get(DECISION_KEY)
                if decision is not None and not decision.quantized:
                    # Annotation's reason promised int4 weights; the report lists the node as float.
                    node.meta[DECISION_KEY] = NodeDecision(False, f"kept float, int4 declined: {reason}")
            else:
                chosen.append(node)
        if not chosen:
            return ir.passes.PassResult(model, modified=False)
        self._ensure_opset(model)
        for node in chosen:
            self._rewrite(model.graph, node)
        add_note(
            model,
            f"int4 weights: {len(chosen)} MatMul(s) with blockwise int4 weights (block {self.block_size} along K, "
            "symmetric); onnxruntime fuses them into MatMulNBits (accuracy level 4 by default: int8 activations "
            "computed at run time)",
        )
        return ir.passes.PassResult(model, modified=True)

    def _decline_reason(self, node: ir.Node) -> str | None:
        if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx"):
            return f"{node.op_type} is not a MatMul (only MatMul has onnxruntime's MatMulNBits kernel)"
        weight = node.inputs[1]
        data = constant_array(weight) if weight is not None else None
        if data is None:
            return "its second input is not a constant weight"
        if data.dtype != np.float32 or data.ndim != 2:
            return f"its weight is {data.dtype} of rank {data.ndim}, not a 2-D float32 matrix"
        if node.inputs[0] is not None and node.inputs[0].producer() is not None:
            if node.inputs[0].producer().op_type == "DequantizeLinear":
                return "its activation input is quantized (int4 needs it float to fuse into MatMulNBits)"
        blocker = matmulnbits_blocker(node)
        if blocker:
            # Unfused, int4 dequantizes the weight every run: slower than float. Say what to do instead.
            return f"{blocker}; int4 here would run slower than float (leave it out of the int4 pattern to get int8)"
        return None

    def _ensure_opset(self, model: ir.Model) -> None:
        opset = model.opset_imports.get("", 0)
        if opset >= INT4_OPSET:
            return
        if self.max_opset is not None and self.max_opset < INT4_OPSET:
            raise UsageError(
                f"int4 weights need opset {INT4_OPSET} (DequantizeLinear block_size) but max_opset is {self.max_opset}"
            )
        version_converter.convert_version(model, INT4_OPSET)
        if model.opset_imports.get("", 0) < INT4_OPSET:
            raise UsageError(f"int4 weights need opset {INT4_OPSET}; the model could not be converted from opset {opset}")
        add_note(model, f"int4 weights: model upgraded from opset {opset} to {INT4_OPSET} (DequantizeLinear block_size)")

    def _rewrite(self, graph: ir.Graph, node: ir.Node) -> None:
        fresh = FreshNames(graph)
        weight = node.inputs[1]
        q, scale = quantize_blockwise_int4(constant_array(weight), self.block_size)
        base = weight.name or node.name
        q_value = ir.Value(name=fresh(f"{base}_int4"), const_value=ir.Tensor(q, dtype=ir.DataType.INT4))
        q_value.dtype, q_value.shape = ir.DataType.INT4, ir.Shape(q.shape)
        scale_value = ir.Value(name=fresh(f"{base}_int4_scale"), const_value=ir.tensor(scale))
        scale_value.dtype, scale_value.shape = ir.DataType.FLOAT, ir.Shape(scale.shape)
        graph.register_initializer(q_value)
        graph.register_initializer(scale_value)
        dq = ir.node(
            "DequantizeLinear",
            [q_value, scale_value],
            attributes={"axis": 0, "block_size": self.block_size},
            outputs=[ir.Value(name=fresh(f"{base}_int4_dequantized"))],
            name=fresh(f"{node.name}_int4_DequantizeLinear"),
        )
        dq.outputs[0].dtype, dq.outputs[0].shape = ir.DataType.FLOAT, weight.shape
        graph.insert_before(node, dq)
        node.replace_input_with(1, dq.outputs[0])
        if weight.is_initializer() and not weight.uses() and not weight.is_graph_output():
            graph.initializers.pop(weight.name)
