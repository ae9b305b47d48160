"""The float-region graph: layers linked through non-layer ops; islands; region counts."""

import onnx_ir.passes.common as common_passes

from qcompile.precision.regions import islands, layer_graph, regions
from tests.precision.models import chain


def test_layers_link_through_relu_and_islands_are_found():
    model = chain()
    common_passes.ShapeInferencePass()(model)
    graph = layer_graph(model, ["mm1", "mm2", "mm3"])
    assert set(graph.edges) == {("mm1", "mm2"), ("mm2", "mm3")}  # through the Relus
    assert regions(graph, {"mm1", "mm3"}) == 2
    assert regions(graph, {"mm1", "mm2"}) == 1
    # mm2 between two float layers would run int8 -> float -> int8: an island.
    assert islands(graph, {"mm1", "mm3"}) == ["mm2"]
    assert islands(graph, {"mm1"}) == []
