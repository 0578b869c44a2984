"""The device loop (engine/runtime/device_loop.py) on a real GPU with a toy CUDA model (tests/support/toy_cuda_model.py): CUDA
graphs replay exactly the eager launches, and the device loop matches the host loop with the same model in numpy."""

import numpy as np
import pytest

from tests.support.conditioning import denoise
from tests.support.gpu import GPU_MARKS
from tests.support.tiny_models import SCHEDULER
from tests.support.toy_model import ToyHostBackend

pytestmark = GPU_MARKS


def plan(steps=6, method="ddpm"):
    from ddengine.core.plan import make_plan

    return make_plan(dict(SCHEDULER), steps, method=method, eta=1.0 if method == "ddim" else 0.0)


def host(spec, p, seeds, classes=None, guidance=None):
    from ddengine.runtime.loop import HostLoop

    return denoise(HostLoop(ToyHostBackend(spec), spec), p, seeds, classes, guidance)[0]


@pytest.fixture(scope="module")
def toy():
    from tests.support.toy_cuda_model import ToyBackend

    return ToyBackend()


@pytest.fixture(scope="module")
def toy_cond():
    from tests.support.toy_cuda_model import ToyBackend

    return ToyBackend(num_classes=4, channels=3)


@pytest.mark.parametrize("method", ["ddpm", "ddim"])
def test_graph_equals_no_graph_equals_host(toy, method):
    from ddengine.runtime.device_loop import DeviceLoop

    seeds, p = np.array([3, 1, 4], dtype=np.uint64), plan(method=method)
    eager, _ = denoise(DeviceLoop(toy, graphs=False), p, seeds, None, None)
    graphed = DeviceLoop(toy, graphs=True)
    first, _ = denoise(graphed, p, seeds, None, None)
    forwards = toy.forwards
    again, bad = denoise(graphed, p, seeds, None, None)  # the cached graph replays every step
    assert toy.forwards == forwards  # no host-side enqueue: all steps were graph launches
    np.testing.assert_array_equal(first, eager)
    np.testing.assert_array_equal(again, eager)
    np.testing.assert_allclose(eager, host(toy.spec, p, seeds), rtol=0, atol=1e-5)
    assert bad.tolist() == [-1, -1, -1]


def test_guided_conditional_loop(toy_cond):
    from ddengine.runtime.device_loop import DeviceLoop

    seeds, classes, p = np.array([10, 20], dtype=np.uint64), np.array([1, 2]), plan(method="ddim")
    eager, _ = denoise(DeviceLoop(toy_cond, graphs=False), p, seeds, classes, 3.0)
    graphed, _ = denoise(DeviceLoop(toy_cond, graphs=True), p, seeds, classes, 3.0)
    np.testing.assert_array_equal(graphed, eager)
    np.testing.assert_allclose(eager, host(toy_cond.spec, p, seeds, classes, 3.0), rtol=0, atol=1e-5)


def test_image_is_the_same_whatever_the_batch(toy):
    from ddengine.runtime.device_loop import DeviceLoop

    loop, seeds = DeviceLoop(toy, graphs=True), np.array([7, 8, 9, 10], dtype=np.uint64)
    np.testing.assert_array_equal(
        denoise(loop, plan(), seeds, None, None)[0][1:3], denoise(loop, plan(), seeds[1:3], None, None)[0]
    )
