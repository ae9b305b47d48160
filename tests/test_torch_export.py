"""export_torch and insert_dropout: numbers against torch, names, dynamic batch, BN kept, Dropout."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest

from qcompile.errors import UsageError
from tests.helpers import count_ops, run

torch = pytest.importorskip("torch")

from qcompile.frontends.torch_export import export_torch, insert_dropout  # noqa: E402


def _conv_bn_net(seed: int = 0) -> torch.nn.Module:
    """Conv-BN-ReLU, pool, Dropout, Linear, with BN statistics that are not the identity."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1, bias=False),
        torch.nn.BatchNorm2d(8),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Dropout(0.5),
        torch.nn.Linear(8, 4),
    )
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return net.eval()


def _images(batch: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((batch, 3, 10, 10)).astype(np.float32)


def _assert_matches_torch(net: torch.nn.Module, model: onnx.ModelProto, images: np.ndarray, name: str = "image") -> None:
    with torch.no_grad():
        expected = net(torch.from_numpy(images)).numpy()
    (got,) = run(model, {name: images})
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4 * float(np.max(np.abs(expected))))


@pytest.fixture(scope="module")
def net_and_model() -> tuple[torch.nn.Module, onnx.ModelProto]:
    net = _conv_bn_net()
    model = export_torch(net, torch.from_numpy(_images(2)), input_names=["image"], output_names=["logits"])
    return net, model


@pytest.mark.parametrize("batch", [1, 5])
def test_export_matches_torch_at_any_batch(net_and_model, batch):
    net, model = net_and_model
    _assert_matches_torch(net, model, _images(batch, seed=batch))


def test_export_keeps_names_and_a_symbolic_batch(net_and_model):
    _, model = net_and_model
    assert [i.name for i in model.graph.input] == ["image"]
    assert [o.name for o in model.graph.output] == ["logits"]
    for value in (model.graph.input[0], model.graph.output[0]):
        dims = value.type.tensor_type.shape.dim
        assert dims[0].dim_param == "batch"
        assert all(d.HasField("dim_value") for d in dims[1:])


def test_export_keeps_batchnorm_and_is_valid_self_contained_onnx(net_and_model):
    _, model = net_and_model
    ops = count_ops(model)
    assert ops["BatchNormalization"] == 2
    assert ops["Conv"] == 2
    # Eval-mode Dropout is dropped by the exporter (an Identity that clean-up removes).
    assert ops["Dropout"] == 0 and ops["Identity"] == 0
    onnx.checker.check_model(model, full_check=True)
    assert all(t.data_location == onnx.TensorProto.DEFAULT for t in model.graph.initializer)
    assert {i.domain: i.version for i in model.opset_import}[""] == 18


def test_export_without_batchnorm_folds_it_and_keeps_the_numbers():
    net = _conv_bn_net()
    model = export_torch(net, torch.from_numpy(_images(2)), input_names=["image"], keep_batchnorm=False)
    assert count_ops(model)["BatchNormalization"] == 0
    _assert_matches_torch(net, model, _images(3))


def test_export_from_a_single_example_still_has_a_dynamic_batch():
    net = _conv_bn_net()
    model = export_torch(net, torch.from_numpy(_images(1)), input_names=["image"])
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    _assert_matches_torch(net, model, _images(4))


def test_export_with_a_fixed_batch():
    net = _conv_bn_net()
    model = export_torch(net, torch.from_numpy(_images(3)), input_names=["image"], dynamic_batch=False)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 3
    _assert_matches_torch(net, model, _images(3))


def test_export_restores_each_modules_mode():
    net = _conv_bn_net().train()
    net[1].eval()  # a mixed state, e.g. frozen BatchNorm while fine-tuning
    modes = [m.training for m in net.modules()]
    export_torch(net, torch.from_numpy(_images(2)))
    assert [m.training for m in net.modules()] == modes


def test_export_of_two_inputs_keeps_their_order_and_names():
    class Blend(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)

        def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
            return self.proj(a) - 2.0 * b

    net = Blend().eval()
    a, b = torch.randn(2, 4), torch.randn(2, 4)
    model = export_torch(net, (a, b), input_names=["left", "right"], output_names=["out"])
    assert [i.name for i in model.graph.input] == ["left", "right"]
    a5, b5 = np.ones((5, 4), np.float32), np.arange(20, dtype=np.float32).reshape(5, 4)
    (got,) = run(model, {"left": a5, "right": b5})
    np.testing.assert_allclose(got, net(torch.from_numpy(a5), torch.from_numpy(b5)).detach().numpy(), rtol=1e-5, atol=1e-5)


def test_a_model_that_fixes_its_batch_is_refused_with_dynamic_batch():
    class FixedBatch(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x.reshape(4, -1) * 2.0

    with pytest.raises(UsageError, match="dynamic_batch=False") as info:
        export_torch(FixedBatch(), torch.randn(4, 3))
    assert "\n" not in str(info.value)
    # Without a dynamic batch it is a valid export.
    model = export_torch(FixedBatch(), torch.randn(4, 3), input_names=["x"], dynamic_batch=False)
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_value == 4


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"opset": 17}, "opset 17 is below 18"),
        ({"input_names": ["a", "b"]}, "2 input names for 1 example inputs"),
        ({"output_names": ["y", "y"]}, "output names must be distinct"),
    ],
)
def test_bad_arguments_are_usage_errors(kwargs, message):
    with pytest.raises(UsageError, match=message):
        export_torch(_conv_bn_net(), torch.from_numpy(_images(2)), **kwargs)


def test_a_non_module_is_a_usage_error():
    with pytest.raises(UsageError, match="torch.nn.Module"):
        export_torch(lambda x: x, torch.randn(2, 3))


def test_missing_torch_is_a_usage_error_naming_the_install_command():
    # A fresh interpreter where `import torch` fails; importing the frontend must still work.
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from qcompile.errors import UsageError\n"
        "from qcompile.frontends.torch_export import export_torch\n"
        "try:\n"
        "    export_torch(object(), ())\n"
        "except UsageError as e:\n"
        "    print(e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "PyTorch is not installed: pip install torch==2.13.0 'qcompile[torch]'"


# ---------------------------------------------------------------------------------------------
# insert_dropout
# ---------------------------------------------------------------------------------------------


def _gemm_input(model: onnx.ModelProto) -> str:
    return next(n for n in model.graph.node if n.op_type == "Gemm").input[0]


def test_insert_dropout_adds_an_inference_dropout_and_keeps_the_numbers(net_and_model):
    _, model = net_and_model
    before = model.SerializeToString()
    target = _gemm_input(model)
    edited = insert_dropout(model, after_output=target, ratio=0.3)

    assert model.SerializeToString() == before  # the input model is untouched
    onnx.checker.check_model(edited, full_check=True)
    assert count_ops(edited) - count_ops(model) == {"Dropout": 1}
    (dropout,) = [n for n in edited.graph.node if n.op_type == "Dropout"]
    assert dropout.input[0] == target and len(dropout.input) == 2 and len(dropout.output) == 1
    ratio = next(t for t in edited.graph.initializer if t.name == dropout.input[1])
    assert onnx.numpy_helper.to_array(ratio) == np.float32(0.3)
    # The classifier now reads the Dropout's output.
    assert _gemm_input(edited) == dropout.output[0]
    images = _images(5)
    np.testing.assert_array_equal(run(edited, {"image": images})[0], run(model, {"image": images})[0])


def test_insert_dropout_on_a_graph_output_keeps_the_output_name(net_and_model):
    _, model = net_and_model
    edited = insert_dropout(model, after_output="logits")
    assert [o.name for o in edited.graph.output] == ["logits"]
    (dropout,) = [n for n in edited.graph.node if n.op_type == "Dropout"]
    assert dropout.output[0] == "logits"
    assert next(n for n in edited.graph.node if n.op_type == "Gemm").output[0] == dropout.input[0]
    images = _images(2)
    np.testing.assert_array_equal(run(edited, {"image": images})[0], run(model, {"image": images})[0])


def test_insert_dropout_on_a_graph_input_rewires_its_consumers(net_and_model):
    _, model = net_and_model
    edited = insert_dropout(model, after_output="image", ratio=0.1)
    onnx.checker.check_model(edited)
    (dropout,) = [n for n in edited.graph.node if n.op_type == "Dropout"]
    assert dropout.input[0] == "image"
    assert all("image" not in n.input for n in edited.graph.node if n is not dropout)
    images = _images(2)
    np.testing.assert_array_equal(run(edited, {"image": images})[0], run(model, {"image": images})[0])


@pytest.mark.parametrize(("name", "ratio", "message"), [("nope", 0.5, "no tensor named 'nope'"), ("logits", 1.0, r"ratio must be in \[0, 1\)")])
def test_insert_dropout_refuses_bad_arguments(net_and_model, name, ratio, message):
    _, model = net_and_model
    with pytest.raises(UsageError, match=message):
        insert_dropout(model, after_output=name, ratio=ratio)


class _TinyEncoder(torch.nn.Module):
    """Embedding → one transformer layer → mean over the sequence: a dynamic-sequence model."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = torch.nn.Embedding(50, 16)
        self.layer = torch.nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
        self.head = torch.nn.Linear(16, 3)

    def forward(self, ids):
        return self.head(self.layer(self.emb(ids)).mean(1))


def test_dynamic_sequence_axis_by_input_name():
    net = _TinyEncoder().eval()
    model = export_torch(net, torch.randint(0, 50, (2, 7)), input_names=["ids"], dynamic_axes={"ids": {1: "sequence"}})
    dims = model.graph.input[0].type.tensor_type.shape.dim
    assert [d.dim_param for d in dims] == ["batch", "sequence"]
    for length in (3, 11):
        ids = torch.randint(0, 50, (4, length))
        with torch.no_grad():
            expected = net(ids).numpy()
        np.testing.assert_allclose(run(model, {"ids": ids.numpy()})[0], expected, rtol=1e-4, atol=1e-5)


def test_dynamic_axes_errors_are_usage_errors():
    net = _TinyEncoder().eval()
    with pytest.raises(UsageError, match="not in input_names"):
        export_torch(net, torch.randint(0, 50, (2, 7)), dynamic_axes={"ids": {1: "sequence"}})
    with pytest.raises(UsageError, match="no axis 2"):
        export_torch(net, torch.randint(0, 50, (2, 7)), input_names=["ids"], dynamic_axes={"ids": {2: "x"}})
