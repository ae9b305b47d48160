"""FoldMatMulScalePass: a quantized MatMul's output times a positive constant scalar costs no kernel.

Attention scales its scores, ``softmax(q kᵀ · c + mask)`` with c = 1/√d (a Mul by c, or a Div by
1/c). Float onnxruntime folds c into FusedMatMul's alpha; the int8 MatMul has no such attribute, so
the Mul stayed a kernel of its own. Dequantization is linear in its scale, so c moves into it:

    DQ(x, s, z) = (x − z) · s          ⇒   MatMul(DQ(a, s_a, z_a), B) · c = MatMul(DQ(a, s_a·c, z_a), B)

(the same for either input, and for a per-channel scale: every entry is multiplied by the scalar).
The dynamic form (``quantize_dynamic_matmul``) scales its int32 result by ``Mul(s_x, s_w)`` and adds
its bias; c goes into the weight scale and the bias:

    (Cast(acc) · (s_x · s_w) + b) · c = Cast(acc) · (s_x · (s_w·c)) + b·c

Both are exact up to float rounding, and onnxruntime still fuses the result into MatMulIntegerToFloat
(the scale is a constant input of that kernel). New initializers hold the scaled scale and bias (the
originals may be shared: a static DequantizeLinear shares its scale with its QuantizeLinear).

The same constant on a MatMul *input* (ViTs scale q before q kᵀ; torch's scaled_dot_product_attention
export scales q and kᵀ by c^½ each) is read by that input's static QuantizeLinear, possibly through
data-movement ops (the head split), and goes into its scale:

    Q(x · c, s, z) = round(x·c / s) + z = Q(x, s / c, z)

the same integers, so the DequantizeLinear keeps s. Run before ``fuse_sibling_matmuls``, this also
lets a scaled q projection share its siblings' single QuantizeLinear.

Rule: a Mul (either input) or Div (divisor) by a constant with one element, positive and finite,
whose other input is the float output of a standard MatMul read by nothing else, and
- that MatMul has an input made by a DequantizeLinear read by nothing else with a constant scale
  (a scalar scale is preferred over a per-channel one), or
- it is the ``Mul(Cast(MatMulInteger), Mul(s_x, s_w))`` of the dynamic form (s_w constant), with or
  without its constant bias Add in between.
Declined, with a note: a Mul whose output is a graph output, or whose MatMul has no DequantizeLinear
input read by it alone. A Mul that is one of several readers of the MatMul output (GELU's Div) is
not its scale and is left silently. A constant of one element but higher rank than the MatMul output would broadcast
the result to a higher rank: not folded. Otherwise, when the Mul's output (not a graph output) reaches
only a QuantizeLinear with a constant one-element scale, through Reshape/Transpose/Squeeze/Unsqueeze/
Flatten/Identity steps each read once, c goes into that QuantizeLinear's scale.

The pipeline runs it for onnxruntime's CPU provider (the target whose int8 MatMul has no alpha).
MiniLM (all-MiniLM-L6-v2): its 6 attention-score Muls go; onnxruntime's optimized graph has 294
nodes instead of 300, outputs unchanged (SQNR 23.54 dB before and after), every quantized op fused.

Precondition: PlaceQDQPass (and, if on, QuantizeDynamicMatMulPass) has run.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from qcompile.graph.names import FreshNames
from qcompile.graph.notes import add_note
from qcompile.graph.queries import chain_to_quantize, constant_array, is_op


# The longest chain of element movement (a scalar factor commutes with each) up to a QuantizeLinear.
_MAX_MOVEMENT = 8


def _only_reader(value: ir.Value, node: ir.Node) -> bool:
    return not value.is_graph_output() and {use.node for use in value.uses()} == {node}


def _scalar_factor(node: ir.Node) -> tuple[ir.Value, float] | None:
    """(the scaled tensor, c) when ``node`` is ``Mul(x, c)``, ``Mul(c, x)`` or ``Div(x, 1/c)``, c > 0 finite."""
    if not (is_op(node, "Mul") or is_op(node, "Div")) or len(node.inputs) != 2 or None in node.inputs:
        return None
    sides = [(1, 0)] if node.op_type == "Div" else [(1, 0), (0, 1)]
    for const_idx, x_idx in sides:
        data = constant_array(node.inputs[const_idx])
        x = node.inputs[x_idx]
        if data is None or data.size != 1 or data.dtype != np.float32 or x.dtype != ir.DataType.FLOAT:
            continue
        if constant_array(x) is not None:
            continue
        rank = len(x.shape) if x.shape is not None else None
        if data.ndim > 0 and (rank is None or data.ndim > rank):
            continue  # it would broadcast the output to a higher rank
        c = float(data.reshape(()))
        if node.op_type == "Div":
            c = 1.0 / c if c != 0 else math.inf
        if c > 0 and math.isfinite(c):
            return x, c
    return None


class FoldMatMulScalePass(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = self._graph = model.graph
        self._names = FreshNames(graph)
        folded: list[str] = []
        for node in list(graph):
            match = _scalar_factor(node)
            if match is None:
                continue
            x, c = match
            outcome = self._fold(x, c, node)
            if outcome is None:
                quantize = self._quantize_reader(node)
                if quantize is None:
                    continue
                # Q(x·c, s) = Q(x, s/c): the integers (and the DequantizeLinear after them) are unchanged.
                quantize.replace_input_with(1, self._scaled(quantize.inputs[1], 1.0 / c))
                ir.convenience.replace_all_uses_with(node.outputs[0], x)
                graph.remove(node, safe=True)
                folded.append(f"{node.name} (×{c:.6g}) into the scale of {quantize.name}")
                continue
            done, where = outcome
            if not done:
                add_note(model, f"fold_matmul_scale declined: {node.name}: {where}")
                continue
            name = node.outputs[0].name
            ir.convenience.replace_all_uses_with(node.outputs[0], x)
            graph.remove(node, safe=True)
            # x now holds what the Mul output held: it takes its name (per-layer comparisons with
            # the float model go by names).
            x.name = name
            folded.append(f"{node.name} (×{c:.6g}) into {where}")
        if folded:
            add_note(model, f"fold_matmul_scale: {len(folded)} constant Mul/Div at a MatMul folded: " + "; ".join(folded))
        return ir.passes.PassResult(model, modified=bool(folded))

    def _fold(self, x: ir.Value, c: float, mul: ir.Node) -> tuple[bool, str] | None:
        """(True, where c went), (False, why a quantized MatMul cannot take it), or None: no quantized MatMul."""
        producer = x.producer()
        bias_add = None
        if is_op(producer, "Add") and len(producer.inputs) == 2:
            # The dynamic form's bias: Add(Mul(Cast(MatMulInteger), scale), b).
            bias_add, producer = producer, producer.inputs[0].producer() if producer.inputs[0] is not None else None
            if _dynamic_scale(producer) is None or constant_array(bias_add.inputs[1]) is None:
                return None
        if is_op(producer, "MatMul"):
            return self._fold_static(x, c, mul, producer)
        scale_mul = _dynamic_scale(producer)
        if scale_mul is None:
            return None
        if mul.outputs[0].is_graph_output():
            return False, "its output is a graph output"
        chain = [(x, mul)]
        if bias_add is not None:
            chain.append((bias_add.inputs[0], bias_add))
        chain.append((producer.inputs[1], producer))
        if not all(_only_reader(value, reader) for value, reader in chain):
            return None  # one reader of several (GELU's Div): not the MatMul's scale
        w_scale = scale_mul.inputs[1]
        scale_mul.replace_input_with(1, self._scaled(w_scale, c))
        if bias_add is not None:
            bias_add.replace_input_with(1, self._scaled(bias_add.inputs[1], c))
        return True, f"{scale_mul.name}'s weight scale" + (" and the bias" if bias_add is not None else "")

    def _fold_static(self, x: ir.Value, c: float, mul: ir.Node, matmul: ir.Node) -> tuple[bool, str] | None:
        dqs = [v.producer() for v in matmul.inputs if v is not None and is_op(v.producer(), "DequantizeLinear")]
        dqs = [dq for dq in dqs if constant_array(dq.inputs[1]) is not None]
        if not dqs:
            return None  # a float MatMul: not ours to change
        if mul.outputs[0].is_graph_output():
            return False, "its output is a graph output"
        if not _only_reader(x, mul):
            return None  # one reader of several: not the MatMul's scale
        dqs = [dq for dq in dqs if _only_reader(dq.outputs[0], matmul)]
        if not dqs:
            return False, f"the DequantizeLinear inputs of {matmul.name} are read elsewhere"
        # A scalar scale first: an activation's, which any per-tensor kernel takes.
        dq = min(dqs, key=lambda n: constant_array(n.inputs[1]).size)
        dq.replace_input_with(1, self._scaled(dq.inputs[1], c))
        return True, f"the scale of {dq.name}"

    @staticmethod
    def _quantize_reader(mul: ir.Node) -> ir.Node | None:
        """The QuantizeLinear (constant one-element scale) that alone reads ``mul``'s output, through movement ops."""
        chain = chain_to_quantize(mul.outputs[0], max_nodes=_MAX_MOVEMENT)
        if chain is None:
            return None
        scale = constant_array(chain[-1].inputs[1])
        return chain[-1] if scale is not None and scale.size == 1 else None

    def _scaled(self, value: ir.Value, c: float) -> ir.Value:
        """A new initializer: ``value``'s data times c, in its dtype."""
        data = constant_array(value)
        scaled = (data.astype(np.float64) * c).astype(data.dtype)
        new = ir.Value(name=self._names(f"{value.name}_folded"), const_value=ir.tensor(scaled))
        new.dtype, new.shape = value.dtype, ir.Shape(scaled.shape)
        self._graph.register_initializer(new)
        return new


def _dynamic_scale(node: ir.Node | None) -> ir.Node | None:
    """The ``Mul(s_x, s_w)`` (s_w constant) when ``node`` is ``Mul(Cast(MatMulInteger), Mul(s_x, s_w))``."""
    if not is_op(node, "Mul") or len(node.inputs) != 2 or None in node.inputs:
        return None
    cast, scale_mul = (v.producer() for v in node.inputs)
    if not is_op(cast, "Cast") or not is_op(scale_mul, "Mul") or len(scale_mul.inputs) != 2:
        return None
    if not is_op(cast.inputs[0].producer(), "MatMulInteger") or constant_array(scale_mul.inputs[1]) is None:
        return None
    return scale_mul
