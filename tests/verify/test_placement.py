"""node_placement: nodes per provider and Memcpy nodes, read from onnxruntime's profile of one run."""

import pytest

from qcompile.verify.placement import node_placement
from qcompile.verify.sessions import cuda_available
from tests.verify.models import feeds, mlp


def test_cpu_placement_counts_every_node_and_no_copies():
    placement = node_placement(mlp(), feeds(1)[0], "cpu")
    assert placement.nodes_by_provider == {"CPUExecutionProvider": 3}  # MatMul, Relu, MatMul
    assert placement.memcpy_nodes == 0 and placement.cpu_nodes == ()
    assert placement.to_json()["cpu_nodes"] == {}


@pytest.mark.gpu
def test_cuda_placement_runs_the_mlp_on_cuda():
    if not cuda_available():
        pytest.skip("onnxruntime's CUDA execution provider is not available")
    placement = node_placement(mlp(), feeds(1)[0], "cuda")
    assert placement.nodes_by_provider.get("CUDAExecutionProvider", 0) >= 3
    assert placement.memcpy_nodes == 0
