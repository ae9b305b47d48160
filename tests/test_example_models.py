"""The architectures in examples/models.py: torchvision's sizes, BN re-estimation, export and run."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import count_ops, run

torch = pytest.importorskip("torch")

from qcompile.frontends.torch_export import export_torch  # noqa: E402


def _load_models():
    path = Path(__file__).resolve().parents[1] / "examples" / "models.py"
    spec = importlib.util.spec_from_file_location("qcompile_example_models", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


models = _load_models()


@pytest.mark.parametrize(
    ("factory", "parameters"),
    # torchvision's published parameter counts for resnet18 and mobilenet_v2 (1000 classes).
    [(lambda: models.ResNet18(), 11_689_512), (lambda: models.MobileNetV2(), 3_504_872)],
)
def test_architectures_have_torchvisions_parameter_counts(factory, parameters):
    assert sum(p.numel() for p in factory().parameters()) == parameters


def test_reestimated_batchnorm_normalises_the_images_it_saw():
    torch.manual_seed(0)
    net = models.ResNet18()
    images = models.synthetic_images(8, size=64, seed=3)
    models.reestimate_batchnorm(net, [images[:4], images[4:]])
    assert not net.training
    with torch.no_grad():
        out = net.bn1(net.conv1(images))
    # Eval-mode BN with the statistics of exactly these images: per-channel mean 0, variance 1.
    np.testing.assert_allclose(out.mean(dim=(0, 2, 3)).numpy(), 0.0, atol=1e-3)
    np.testing.assert_allclose(out.var(dim=(0, 2, 3), unbiased=False).numpy(), 1.0, atol=0.02)
    assert all(m.momentum == 0.1 for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("factory", "ops"),
    [
        (lambda: models.ResNet18(num_classes=10), {"Conv": 20, "BatchNormalization": 20, "Add": 8, "Gemm": 1}),
        (lambda: models.MobileNetV2(num_classes=10), {"Conv": 52, "BatchNormalization": 52, "Add": 10, "Gemm": 1}),
    ],
    ids=["resnet18", "mobilenet_v2"],
)
def test_architectures_export_and_run_like_torch(factory, ops):
    torch.manual_seed(0)
    net = factory()
    models.reestimate_batchnorm(net, [models.synthetic_images(4, size=32, seed=1)])
    model = export_torch(net, models.synthetic_images(2, size=32), input_names=["image"], output_names=["logits"])
    counts = count_ops(model)
    assert {op: counts[op] for op in ops} == ops
    images = models.synthetic_images(3, size=32, seed=2)
    with torch.no_grad():
        expected = net(images).numpy()
    (got,) = run(model, {"image": images.numpy()})
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4 * float(np.abs(expected).max()))
