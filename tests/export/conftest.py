"""Fixtures for the export tests: a tiny U-Net with random (non-zero-init) weights and its ONNX export."""

import pytest

torch = pytest.importorskip("torch")

from tests.support.export_helpers import randomized, tiny_config  # noqa: E402
from tests.support.trt_fixtures import cond16, fake_trt, no_trt, onnx16, onnx32  # noqa: E402,F401  (TensorRT build tests)


@pytest.fixture(scope="session")
def tiny_unet():
    from ddengine.nets.unet import UNet

    torch.manual_seed(0)
    return randomized(UNet(tiny_config()))


@pytest.fixture(scope="session")
def tiny_spec():
    from ddengine.export.onnx_export import spec_for
    from ddengine.export.train import scheduler_dict

    return spec_for(scheduler_dict(), 1, 16, 16, 3)


@pytest.fixture(scope="session")
def tiny_onnx(tiny_unet, tiny_spec):
    """The fp32 ModelProto of the tiny U-Net (one dynamo export shared by the tests)."""
    from ddengine.export.onnx_export import to_onnx

    return to_onnx(tiny_unet, tiny_spec)
