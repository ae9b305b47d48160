"""DecomposeBatchNormPass: a BatchNormalization that could not be folded becomes Mul + Add.

Inference BatchNormalization is, per channel c on axis 1 (ONNX spec; ``epsilon`` defaults to 1e-5),

    y = γ[c]·(x - μ[c]) / sqrt(σ²[c] + ε) + β[c] = a[c]·x + b[c],
    a = γ / sqrt(σ² + ε),    b = β - a·μ,

so ``y = Add(Mul(x, a'), b')`` with a', b' constants shaped (C, 1, ..., 1): rank(x) - 1 axes, which
numpy-style broadcasting lines up with x's axes 1..rank-1, i.e. channel on axis 1. Mul and Add are
ops the quantizer already handles, where a BN left alone would block it.

Preconditions: the BN rule of FoldBatchNormPass holds (inference mode, statistics outputs unused,
constant per-channel parameters) and the input's rank is known (it fixes the constants' shape).
Otherwise the BN stays and a note says why. Run after FoldBatchNormPass, which removes the BNs it
can without adding ops. Math in float64; constants take the input's dtype. Covers the main graph and
subgraphs, not model-local functions.
"""

from __future__ import annotations

import onnx_ir as ir

from qcompile.graph.queries import constant_array
from qcompile.passes.fold_batchnorm import (
    add_initializer,
    batchnorm_affine,
    batchnorm_decline_reason,
    batchnorm_nodes,
    names_in_use,
    note_batchnorm_kept,
    take_over_output,
)


class DecomposeBatchNormPass(ir.passes.InPlacePass):
    """Rewrite every inference BatchNormalization with constant parameters as Mul + Add."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        names = names_in_use(model.graph)
        modified = False
        for bn in batchnorm_nodes(model):
            rank = _input_rank(bn)
            reason = batchnorm_decline_reason(bn) or _why_rank_unusable(rank)
            if reason is not None:
                note_batchnorm_kept(model, bn, reason)
                continue
            _decompose(bn, rank, names)
            modified = True
        return ir.passes.PassResult(model, modified=modified)


def _input_rank(bn: ir.Node) -> int | None:
    # x and y have the same shape; either may carry it.
    for value in (bn.inputs[0], bn.outputs[0]):
        if value is not None and value.shape is not None:
            return value.shape.rank()
    return None


def _why_rank_unusable(rank: int | None) -> str | None:
    if rank is None:
        return "its input's rank is unknown, so the per-channel constants cannot be shaped (run shape inference)"
    if rank < 2:
        return f"its input has rank {rank}; BatchNormalization needs (N, C, ...)"
    return None


def _decompose(bn: ir.Node, rank: int, names: set[str]) -> None:
    x = bn.inputs[0]
    affine = batchnorm_affine(bn)
    # Mul and Add need both operands in x's type; the parameters may differ from it (opset 15+).
    dtype = x.dtype.numpy() if x.dtype is not None else constant_array(bn.inputs[1]).dtype
    # (C, 1, ..., 1): broadcasting aligns trailing axes, so channel lands on x's axis 1.
    channel_shape = (affine.scale.shape[0],) + (1,) * (rank - 2)
    base = bn.outputs[0].name or "batchnorm"
    graph = bn.graph
    scale = add_initializer(graph, names, f"{base}_bn_scale", affine.scale.reshape(channel_shape).astype(dtype))
    shift = add_initializer(graph, names, f"{base}_bn_shift", affine.shift.reshape(channel_shape).astype(dtype))
    mul = ir.node("Mul", [x, scale])
    add = ir.node("Add", [mul.outputs[0], shift])
    for out in (mul.outputs[0], add.outputs[0]):
        out.type = bn.outputs[0].type if bn.outputs[0].type is not None else x.type
        out.shape = bn.outputs[0].shape if bn.outputs[0].shape is not None else x.shape
    graph.insert_before(bn, [mul, add])
    take_over_output(bn, add.outputs[0])

