"""Where onnxruntime runs each node: nodes per execution provider and the memory copies it inserted.

On the CUDA provider, a node without a CUDA kernel falls back to the CPU and onnxruntime inserts
``MemcpyToHost`` / ``MemcpyFromHost`` nodes around it: each is a device↔host copy per run, which is
how a quantized model ends up slower than float on a GPU. The placement is read from onnxruntime's
own profile of one run (each node event names its provider), so it is what really ran, after every
graph optimization. Copies of the graph's inputs and outputs are made outside the graph and are not
counted.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from qcompile.errors import InvalidDataError
from qcompile.verify.sessions import Provider, make_session

_MEMCPY = ("MemcpyToHost", "MemcpyFromHost")


@dataclass(frozen=True)
class Placement:
    provider: str
    nodes_by_provider: dict[str, int] = field(default_factory=dict)
    cpu_nodes: tuple[str, ...] = ()  # op types of the nodes on the CPU when the provider is not the CPU
    memcpy_nodes: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "nodes_by_provider": dict(sorted(self.nodes_by_provider.items())),
            "cpu_nodes": dict(sorted(Counter(self.cpu_nodes).items())),
            "memcpy_nodes": self.memcpy_nodes,
        }


def node_placement(model: onnx.ModelProto, feed: dict[str, np.ndarray], provider: Provider = "cpu") -> Placement:
    """Run ``model`` once on ``provider`` with profiling and count nodes per provider and Memcpy nodes."""
    with tempfile.TemporaryDirectory(prefix="qcompile-placement-") as tmp:
        session = make_session(model, provider, profile_prefix=os.path.join(tmp, "profile"))
        try:
            session.run(None, feed)
        except Exception as exc:  # onnxruntime's pybind errors derive from Exception only
            raise InvalidDataError(f"the model cannot run on the placement feed: {exc}") from None
        with open(session.end_profiling()) as handle:
            events = json.load(handle)
    by_provider: Counter = Counter()
    cpu_ops: list[str] = []
    memcpy = 0
    seen: set[str] = set()
    for event in events:
        args = event.get("args") or {}
        name = event.get("name", "")
        if event.get("cat") != "Node" or "provider" not in args or not name.endswith("_kernel_time"):
            continue
        node = name[: -len("_kernel_time")]
        if node in seen:  # one event per run of the node; one run was made
            continue
        seen.add(node)
        by_provider[args["provider"]] += 1
        op = args.get("op_name", "?")
        if op in _MEMCPY:
            memcpy += 1
        elif args["provider"] == "CPUExecutionProvider" and provider != "cpu":
            cpu_ops.append(op)
    return Placement(provider=provider, nodes_by_provider=dict(by_provider), cpu_nodes=tuple(cpu_ops), memcpy_nodes=memcpy)

