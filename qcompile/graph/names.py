"""Fresh value and node names for passes that add to a graph."""

from __future__ import annotations

import onnx_ir as ir


class FreshNames:
    """Names not yet used in a graph: its inputs, initializers and node outputs, plus every name
    handed out so far. ``fresh("x_scale")`` gives ``x_scale``, or ``x_scale_1``, ``x_scale_2``, ..."""

    def __init__(self, graph: ir.Graph) -> None:
        self._taken = {v.name for v in graph.inputs} | set(graph.initializers)
        self._taken |= {o.name for n in graph for o in n.outputs}

    def __call__(self, base: str) -> str:
        name, i = base, 1
        while name in self._taken:
            name, i = f"{base}_{i}", i + 1
        self._taken.add(name)
        return name

    def __contains__(self, name: str) -> bool:
        return name in self._taken

    def release(self, name: str) -> None:
        """``name`` is free again (its value was renamed)."""
        self._taken.discard(name)
