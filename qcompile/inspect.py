"""``qcompile inspect``: what a model holds and what a compile would quantize (no data needed)."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from qcompile.data import input_specs
from qcompile.graph.io import load_model
from qcompile.options import CompileOptions
from qcompile.passes import AnnotatePass
from qcompile.passes.annotate import decision_summary
from qcompile.pipeline import PassRunner, cleanup_passes
from qcompile.quant.spec import NOT_FLOAT_DATA


@dataclass
class ModelInfo:
    source: str
    opset: int
    size_bytes: int
    parameters: int
    ops: dict[str, int]
    domains: list[str]
    inputs: list[str]
    outputs: list[str]
    would_quantize: dict[str, int]
    would_stay_float: list[dict[str, str]]
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dict(vars(self))

    def render_text(self) -> str:
        lines = [
            f"{self.source}: opset {self.opset}, {self.size_bytes / 1024:.1f} KiB, {self.parameters:,} parameters",
            f"inputs:  {', '.join(self.inputs)}",
            f"outputs: {', '.join(self.outputs)}",
            f"domains: {', '.join(self.domains)}",
            "ops: " + ", ".join(f"{op}×{n}" for op, n in sorted(self.ops.items())),
            "would quantize (after clean-up): "
            + (", ".join(f"{op}×{n}" for op, n in sorted(self.would_quantize.items())) or "nothing"),
        ]
        if self.would_stay_float:
            lines.append("would stay float:")
            lines += [f"  {f['name'] or '?'} ({f['op_type']}): {f['reason']}" for f in self.would_stay_float]
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def inspect_model(model: str | os.PathLike | onnx.ModelProto, options: CompileOptions | None = None) -> ModelInfo:
    options = options or CompileOptions(show_progress=False)
    loaded = load_model(model)
    proto = ir.to_proto(loaded.model)
    parameters = sum(int(np.prod(t.dims)) for t in proto.graph.initializer)
    ir_model = loaded.model
    specs = input_specs(ir_model)
    runner = PassRunner(options)
    ir_model = runner.run(ir_model, cleanup_passes())
    ir_model = runner.run(ir_model, [("annotate", AnnotatePass(options.scheme))])
    quantize, left_float = decision_summary(ir_model)
    stay_float = [
        {"name": name, "op_type": op, "reason": reason} for name, op, reason in left_float if reason != NOT_FLOAT_DATA
    ]
    return ModelInfo(
        source=loaded.source,
        opset=loaded.original_opset,
        size_bytes=proto.ByteSize(),
        parameters=parameters,
        ops=dict(Counter(n.op_type for n in proto.graph.node)),
        domains=sorted({n.domain or "ai.onnx" for n in proto.graph.node}),
        inputs=[f"{s.name} {s.dtype} {s.shape_text()}" for s in specs],
        outputs=[o.name for o in proto.graph.output],
        would_quantize=quantize,
        would_stay_float=stay_float,
        notes=list(loaded.notes),
    )
