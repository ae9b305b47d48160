"""FreshNames: names no value or node output of the graph uses, nor any name handed out before."""

import numpy as np

from qcompile.graph.names import FreshNames
from tests.helpers import parse_model


def test_fresh_names_skip_inputs_initializers_outputs_and_earlier_names():
    model = parse_model(
        """<ir_version: 8, opset_import: ["" : 17]>
        g (float[2] x) => (float[2] y) { y = Add(x, w) }""",
        {"w": np.ones(2, np.float32)},
    )
    fresh = FreshNames(model.graph)
    assert fresh("z") == "z" and fresh("z") == "z_1"
    assert fresh("x") == "x_1" and fresh("w") == "w_1" and fresh("y") == "y_1"
    assert "y" in fresh
    fresh.release("y")
    assert fresh("y") == "y"
