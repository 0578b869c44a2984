"""GpuLoop (engine/gpu_sampler.py) with a toy CUDA model: CUDA graphs replay exactly the no-graph launches, and
the device loop matches the CPU loop (C step kernel + the same model in numpy)."""
import numpy as np
import pytest
from gpu_support import needs_gpu
from tiny_models import SCHEDULER
from toy_cuda_model import cpu_loop

pytestmark = needs_gpu


def plan(steps=6, method="ddpm"):
    from ddengine.plan import make_plan

    return make_plan(dict(SCHEDULER), steps, method=method, eta=1.0 if method == "ddim" else 0.0)


@pytest.fixture(scope="module")
def toy():
    from toy_cuda_model import ToyBackend

    return ToyBackend()


@pytest.fixture(scope="module")
def toy_cond():
    from toy_cuda_model import ToyBackend

    return ToyBackend(num_classes=4, channels=3)


@pytest.mark.parametrize("method", ["ddpm", "ddim"])
def test_graph_equals_no_graph_equals_cpu(toy, method):
    from ddengine.gpu_sampler import GpuLoop

    seeds = np.array([3, 1, 4], dtype=np.uint64)
    p = plan(method=method)
    eager = GpuLoop(toy, p, graphs=False).denoise(seeds)
    graphed_loop = GpuLoop(toy, p, graphs=True)
    first = graphed_loop.denoise(seeds)
    forwards = toy.forwards
    again = graphed_loop.denoise(seeds)  # the cached graph replays every step
    assert toy.forwards == forwards  # no host-side enqueue: all steps were graph launches
    np.testing.assert_array_equal(first, eager)
    np.testing.assert_array_equal(again, eager)
    np.testing.assert_allclose(eager, cpu_loop(toy.spec, p, seeds, None, None), rtol=0, atol=1e-5)


def test_guided_conditional_loop(toy_cond):
    from ddengine.gpu_sampler import GpuLoop

    seeds = np.array([10, 20], dtype=np.uint64)
    labels = np.array([4, 4, 1, 2], dtype=np.int64)  # [null; classes]
    p = plan(method="ddim")
    eager = GpuLoop(toy_cond, p, guidance=3.0, graphs=False).denoise(seeds, labels)
    graphed = GpuLoop(toy_cond, p, guidance=3.0, graphs=True).denoise(seeds, labels)
    np.testing.assert_array_equal(graphed, eager)
    np.testing.assert_allclose(eager, cpu_loop(toy_cond.spec, p, seeds, labels, 3.0), rtol=0, atol=1e-5)


def test_image_is_the_same_whatever_the_batch(toy):
    from ddengine.gpu_sampler import GpuLoop

    loop = GpuLoop(toy, plan(), graphs=True)
    seeds = np.array([7, 8, 9, 10], dtype=np.uint64)
    np.testing.assert_array_equal(loop.denoise(seeds)[1:3], loop.denoise(seeds[1:3]))


def test_graphs_required_but_not_capturable_is_refused(toy):
    from ddengine.gpu_sampler import GpuLoop
    from toy_cuda_model import ToyRunner

    class Uncapturable(ToyRunner):
        supports_capture = False

    toy.open_runner = lambda stream: Uncapturable(toy, stream)
    try:
        with pytest.raises(ValueError, match="cannot be captured"):
            GpuLoop(toy, plan(), graphs=True).denoise(np.array([1], np.uint64))
    finally:
        del toy.open_runner
