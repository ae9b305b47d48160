"""FuseSiblingMatMulsPass: MatMuls that read one dynamically quantized input run as one MatMul.

``quantize_dynamic_matmul`` gives every MatMul reading a float tensor x its own integer product:

    x_q, s_x, z_x = DynamicQuantizeLinear(x)
    y_i = Cast<float>(MatMulInteger(x_q, W_i, z_x)) * Mul(s_x, s_w_i) + b_i      for i = 1..n

(attention's query/key/value projections are n = 3 such siblings). With constant int8 weights W_i
of the same K, weight type and zero point, the n products are the column blocks of one product:

    W = [W_1 | ... | W_n]   s_w = [s_w_1 | ... | s_w_n]   b = [b_1 | ... | b_n]   (per output column;
                                                          a scalar scale repeats over its columns,
                                                          a missing bias is 0)
    y = Cast<float>(MatMulInteger(x_q, W, z_x)) * Mul(s_x, s_w) + b
    y_1, ..., y_n = Split(y, [N_1, ..., N_n], axis=-1)

The int32 sums are the same integers and each column is scaled by the same two floats, so y_i is
bit-identical. onnxruntime fuses the new form into one DynamicQuantizeMatMul (the
DynamicQuantizeLinear now has a single reader): one wider GEMM and one Split where it ran a
DynamicQuantizeLinear and n MatMulIntegerToFloat kernels, each paying the per-kernel overhead that
dominates at small batch (all-MiniLM-L6-v2 at 13 tokens: ~16 µs per projection kernel).

When every y_i reaches only a static QuantizeLinear with a scalar scale (y_i may first pass through
data-movement ops: Reshape, Transpose, ... — attention's head split), and all N_i are equal, the n
QuantizeLinear become one before the Split. Quantizing with one scale per output column is slow in
onnxruntime (its per-axis loop runs per element when the axis is the last one: 315 µs for a
[1, 13, 1152] tensor, against 12 µs for a Split and three scalar QuantizeLinear), so y is reshaped
to [..., n, N] and quantized per axis -2 (one scalar per sibling), then reshaped back:

    q = Reshape(QuantizeLinear(Reshape(y, [..., n, N]), [s_1..s_n], [z_1..z_n], axis=-2), [..., n·N])
    q_1, ..., q_n = Split(q, [N, ..., N], axis=-1)

q_i = round(y_i / s_i) + z_i saturated, the same values the scalar QuantizeLinear gave; the
movement ops then run on the int8 tensor and feed the old QuantizeLinear's readers (its
DequantizeLinear keeps the scalar scale). onnxruntime moves a lone QuantizeLinear up through those
ops itself, so either way they run on int8; the one QuantizeLinear measured ~3% faster on
all-MiniLM-L6-v2 than the float Split with three. Otherwise (unequal widths, a float reader, a graph
output, unknown rank) the float y is split and each y_i keeps its readers.

Siblings whose weight is not a constant 2-D int8 tensor, or whose weight zero point differs from the
others', keep their own product (a note says so when that leaves a group unfused).

Precondition: QuantizeDynamicMatMulPass has run (the form above, with its operand order, which is
the order onnxruntime's MatMulIntegerToFloat fusion matches).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from qcompile.graph.names import FreshNames
from qcompile.graph.notes import add_note
from qcompile.graph.queries import chain_to_quantize, constant_array, opset_version, sole_reader
from qcompile.quant.spec import DECISION_KEY

# Ops that move or relabel elements without changing values: a scalar-scale QuantizeLinear commutes
# with them. Each must read the moved tensor as its first input.


@dataclass
class _Sibling:
    integer: ir.Node  # MatMulInteger(x_q, W, z_x[, z_w])
    nodes: list[ir.Node]  # the sibling's nodes, MatMulInteger first
    weight: np.ndarray  # [K, N] int8
    w_scale: np.ndarray  # [N]
    bias: np.ndarray | None  # [N]
    out: ir.Value  # y_i: the rescaled product, bias included

    @property
    def columns(self) -> int:
        return int(self.weight.shape[1])


class FuseSiblingMatMulsPass(ir.passes.InPlacePass):
    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        self._graph, self._fresh, self._opset = graph, FreshNames(graph), opset_version(model)
        fused = quantize_fused = members = 0
        for dql in [n for n in graph if n.op_type == "DynamicQuantizeLinear" and n.domain in ("", "ai.onnx")]:
            groups, declined = _siblings(dql)
            for reason, count in declined.items():
                if count and sum(len(g) for g in groups.values()) + count > 1:
                    add_note(model, f"{count} MatMul(s) reading {dql.inputs[0].name!r} keep their own product "
                                    f"instead of joining their siblings': {reason}")
            for group in groups.values():
                if len(group) < 2:
                    continue
                quantize_fused += self._fuse(dql, group)
                fused, members = fused + 1, members + len(group)
        if fused:
            add_note(model, f"{members} MatMuls sharing a dynamically quantized input run as {fused} "
                            f"(concatenated weights, then a Split); {quantize_fused} of the {fused} quantize their "
                            f"output once before the Split")
        return ir.passes.PassResult(model, modified=fused > 0)

    def _value(self, base: str, dtype: ir.DataType | None = None, shape: ir.Shape | None = None) -> ir.Value:
        value = ir.Value(name=self._fresh(base))
        if dtype is not None:
            value.dtype = dtype
        value.shape = shape
        return value

    def _constant(self, base: str, array: np.ndarray) -> ir.Value:
        value = ir.Value(name=self._fresh(base), const_value=ir.tensor(array))
        self._graph.register_initializer(value)
        return value

    def _fuse(self, dql: ir.Node, group: list[_Sibling]) -> bool:
        """Replace the group by one product and a Split; True when the QuantizeLinear moved before it."""
        x_q, x_scale, x_zero_point = dql.outputs
        first = group[0].integer
        base = first.name or "MatMul"
        widths = [s.columns for s in group]
        out_shape = None
        if x_q.shape is not None:
            out_shape = ir.Shape([*x_q.shape[:-1], sum(widths)])
        inputs = [x_q, self._constant(f"{base}_fused_weight", np.concatenate([s.weight for s in group], axis=1)),
                  x_zero_point, *first.inputs[3:]]  # the weight zero point, the same for the group
        integer = ir.node("MatMulInteger", inputs, outputs=[self._value(f"{base}_fused_int32", ir.DataType.INT32, out_shape)],
                          name=self._fresh(f"{base}_fused_MatMulInteger"))
        if DECISION_KEY in first.meta:
            integer.meta[DECISION_KEY] = first.meta[DECISION_KEY]
        cast = ir.node("Cast", integer.outputs, attributes={"to": ir.DataType.FLOAT},
                       outputs=[self._value(f"{base}_fused_float", ir.DataType.FLOAT, out_shape)], name=self._fresh(f"{base}_fused_Cast"))
        w_scale = self._constant(f"{base}_fused_weight_scale", np.concatenate([s.w_scale for s in group]).astype(np.float32))
        scale = ir.node("Mul", [x_scale, w_scale], outputs=[self._value(f"{base}_fused_output_scale", ir.DataType.FLOAT)],
                        name=self._fresh(f"{base}_fused_scale_Mul"))
        rescale = ir.node("Mul", [cast.outputs[0], scale.outputs[0]],
                          outputs=[self._value(f"{base}_fused_rescaled", ir.DataType.FLOAT, out_shape)], name=self._fresh(f"{base}_fused_Mul"))
        new_nodes = [integer, cast, scale, rescale]
        result = rescale.outputs[0]
        if any(s.bias is not None for s in group):
            bias = np.concatenate([s.bias if s.bias is not None else np.zeros(s.columns, np.float32) for s in group])
            add = ir.node("Add", [result, self._constant(f"{base}_fused_bias", bias.astype(np.float32))],
                          outputs=[self._value(f"{base}_fused_biased", ir.DataType.FLOAT, out_shape)], name=self._fresh(f"{base}_fused_bias_Add"))
            new_nodes.append(add)
            result = add.outputs[0]
        chains = [_quantize_chain(s.out) for s in group]
        rank = len(out_shape) if out_shape is not None else None
        grouped = (self._opset >= 13 and rank is not None and rank >= 2 and len(set(widths)) == 1
                   and all(c is not None for c in chains) and len({c[-1].inputs[2].dtype for c in chains}) == 1)
        if grouped:
            new_nodes += self._quantize_then_split(result, group, chains, rank)
        else:
            split = self._split(result, widths, base, [s.out.dtype for s in group])
            new_nodes.append(split)
            for sibling, part in zip(group, split.outputs):
                name = sibling.out.name
                sibling.out.name = self._fresh(f"{name}_unfused")
                part.name, part.shape = name, sibling.out.shape
                sibling.out.replace_all_uses_with(part, replace_graph_outputs=True)
        self._graph.insert_after(dql, new_nodes)
        for sibling in group:
            self._graph.remove(list(reversed(sibling.nodes)), safe=True)
        return grouped

    def _split(self, value: ir.Value, widths: list[int], base: str, dtypes: list) -> ir.Node:
        outputs = [self._value(f"{base}_fused_part", dtype) for dtype in dtypes]
        if self._opset >= 13:
            sizes = self._constant(f"{base}_fused_split", np.array(widths, np.int64))
            return ir.node("Split", [value, sizes], attributes={"axis": -1}, outputs=outputs, name=self._fresh(f"{base}_fused_Split"))
        return ir.node("Split", [value], attributes={"axis": -1, "split": widths}, outputs=outputs, name=self._fresh(f"{base}_fused_Split"))

    def _quantize_then_split(self, result: ir.Value, group: list[_Sibling], chains: list[list[ir.Node]], rank: int) -> list[ir.Node]:
        """One QuantizeLinear (one scale per sibling) before the Split; the movement ops run on int8."""
        base = group[0].integer.name or "MatMul"
        n, width = len(group), group[0].columns
        quants = [chain[-1] for chain in chains]
        dtype = quants[0].inputs[2].dtype
        # Leading 0s copy the batch dims (Reshape's allowzero is 0 by default).
        blocks = self._constant(f"{base}_fused_blocks_shape", np.array([0] * (rank - 1) + [n, width], np.int64))
        flat = self._constant(f"{base}_fused_flat_shape", np.array([0] * (rank - 1) + [n * width], np.int64))
        to_blocks = ir.node("Reshape", [result, blocks], outputs=[self._value(f"{base}_fused_blocks", ir.DataType.FLOAT)],
                            name=self._fresh(f"{base}_fused_blocks_Reshape"))
        scales = np.array([constant_array(q.inputs[1]).item() for q in quants], np.float32)
        zero_points = np.array([constant_array(q.inputs[2]).item() for q in quants], dtype.numpy())
        quantize = ir.node(
            "QuantizeLinear",
            [to_blocks.outputs[0], self._constant(f"{base}_fused_scale", scales), self._constant(f"{base}_fused_zero_point", zero_points)],
            attributes={"axis": rank - 1},
            outputs=[self._value(f"{base}_fused_quantized_blocks", dtype)],
            name=self._fresh(f"{base}_fused_QuantizeLinear"),
        )
        to_flat = ir.node("Reshape", [quantize.outputs[0], flat], outputs=[self._value(f"{base}_fused_quantized", dtype)],
                          name=self._fresh(f"{base}_fused_flat_Reshape"))
        split = self._split(to_flat.outputs[0], [width] * n, base, [dtype] * n)
        for sibling, chain, part in zip(group, chains, split.outputs):
            part.shape = sibling.out.shape
            quant = chain[-1]
            if len(chain) == 1:
                tail = part
            else:
                chain[0].replace_input_with(0, part)
                for movement in chain[:-1]:
                    # Now integer: a float model's tensor name must not hold integers (the
                    # precision search's keep-one-float edit and name-based comparisons read
                    # such a name as the float tensor).
                    movement.outputs[0].dtype = dtype
                    movement.outputs[0].name = self._fresh(f"{movement.outputs[0].name}_quantized")
                tail = chain[-2].outputs[0]
            name = quant.outputs[0].name
            quant.outputs[0].name = self._fresh(f"{name}_unfused")
            tail.name = name  # the quantized tensor's name, read by its DequantizeLinear as before
            quant.outputs[0].replace_all_uses_with(tail, replace_graph_outputs=True)
            self._graph.remove(quant, safe=True)
        return [to_blocks, quantize, to_flat, split]


def _siblings(dql: ir.Node) -> tuple[dict[tuple, list[_Sibling]], dict[str, int]]:
    """The MatMulInteger chains reading the DynamicQuantizeLinear, grouped by what must match to fuse."""
    groups: dict[tuple, list[_Sibling]] = defaultdict(list)
    declined: dict[str, int] = defaultdict(int)
    x_q = dql.outputs[0]
    for use in list(x_q.uses()):
        node = use.node
        if node.op_type != "MatMulInteger" or node.domain not in ("", "ai.onnx") or use.idx != 0:
            continue
        sibling = _match(dql, node)
        if sibling is None:
            continue
        if isinstance(sibling, str):
            declined[sibling] += 1
            continue
        weight_zero_point = constant_array(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else None
        if weight_zero_point is not None and weight_zero_point.size != 1:
            declined["a per-column weight zero point"] += 1
            continue
        zp_key = None if weight_zero_point is None or not weight_zero_point.any() else weight_zero_point.item()
        groups[(sibling.weight.shape[0], zp_key)].append(sibling)
    if len(groups) > 1:
        # Members of all but the largest group lose their siblings over a different weight zero point.
        largest = max(len(g) for g in groups.values())
        declined["its weight zero point differs"] += sum(len(g) for g in groups.values() if len(g) < largest)
    return groups, declined


def _match(dql: ir.Node, integer: ir.Node) -> _Sibling | str | None:
    """The sibling of ``quantize_dynamic_matmul``'s form, a reason it cannot fuse, or None (another form)."""
    if len(integer.inputs) < 3 or integer.inputs[2] is not dql.outputs[2]:
        return None
    weight = constant_array(integer.inputs[1])
    if weight is None:
        return "its weight is not a constant"
    if weight.dtype != np.int8 or weight.ndim != 2:
        return "its weight is not a 2-D int8 matrix"
    cast = sole_reader(integer.outputs[0])
    if cast is None or cast.op_type != "Cast" or cast.attributes.get_int("to") != ir.DataType.FLOAT:
        return None
    rescale = sole_reader(cast.outputs[0])
    if rescale is None or rescale.op_type != "Mul" or rescale.inputs[0] is not cast.outputs[0]:
        return None
    scale = rescale.inputs[1].producer()
    if scale is None or scale.op_type != "Mul" or scale.inputs[0] is not dql.outputs[1] or sole_reader(scale.outputs[0]) is not rescale:
        return None
    w_scale = constant_array(scale.inputs[1])
    if w_scale is None or w_scale.size not in (1, weight.shape[1]):
        return None
    nodes, out, bias = [integer, cast, scale, rescale], rescale.outputs[0], None
    add = sole_reader(out)
    if add is not None and add.op_type == "Add" and add.inputs[0] is out:
        data = constant_array(add.inputs[1])
        if data is not None and data.ndim == 1 and data.shape[0] == weight.shape[1] and add.inputs[1].dtype == ir.DataType.FLOAT:
            nodes, out, bias = nodes + [add], add.outputs[0], data
    w_scale = np.broadcast_to(w_scale.reshape(-1), (weight.shape[1],))
    return _Sibling(integer, nodes, weight, w_scale, bias, out)


def _quantize_chain(value: ir.Value) -> list[ir.Node] | None:
    """[movement ops..., QuantizeLinear] when the value's only path is that, with a scalar scale."""
    chain = chain_to_quantize(value)
    if chain is None:
        return None
    quant = chain[-1]
    if quant.outputs[0].is_graph_output() or len(quant.inputs) != 3 or set(quant.attributes) - {"axis"}:
        return None
    scale, zero_point = constant_array(quant.inputs[1]), constant_array(quant.inputs[2])
    if scale is None or zero_point is None or scale.size != 1 or zero_point.size != 1:
        return None
    return chain if quant.inputs[2].dtype in (ir.DataType.UINT8, ir.DataType.INT8) else None
