"""The CUDA step kernels (NVRTC, via cuda_step.py) against the C kernels (ddengine._kernels): same noise, same step."""
import numpy as np
import pytest
from gpu_support import needs_gpu

pytestmark = needs_gpu

SHAPE = (3, 3, 7, 5)  # 105 elements per image: the last quad is partial


@pytest.fixture(scope="module")
def gpu():
    from ddengine.cuda_step import Stream, step_kernels

    kernels = step_kernels(0)
    stream = Stream()
    yield kernels, stream
    stream.close()


def dev(array, stream):
    from ddengine.cuda_step import DeviceArray

    return DeviceArray.from_host(array, stream)


def test_fill_noise_equals_the_c_kernel(gpu):
    from ddengine import _kernels

    kernels, stream = gpu
    seeds = np.array([0, 12345, 2**64 - 1], dtype=np.uint64)
    expected = np.empty(SHAPE, np.float32)
    _kernels.fill_noise(expected, seeds)
    out, d_seeds = dev(np.zeros(SHAPE, np.float32), stream), dev(seeds, stream)
    kernels.fill_noise(stream, out, d_seeds, SHAPE[0], int(np.prod(SHAPE[1:])))
    np.testing.assert_array_equal(out.download(stream), expected)


@pytest.mark.parametrize("guidance, clip", [(None, None), (None, 1.0), (4.0, 1.0)])
def test_step_equals_the_c_kernel(gpu, guidance, clip):
    from ddengine import _kernels

    kernels, stream = gpu
    rng = np.random.default_rng(7)
    b, per_image = SHAPE[0], int(np.prod(SHAPE[1:]))
    x = rng.standard_normal(SHAPE).astype(np.float32)
    model_out = rng.standard_normal(((2 if guidance else 1) * b, *SHAPE[1:])).astype(np.float32)
    table = rng.uniform(-1.5, 1.5, (5, 9)).astype(np.float32)  # row 3: sigma != 0, so noise is drawn
    seeds = np.array([1, 2, 3], dtype=np.uint64)
    expected = x.copy()
    _kernels.step(expected, model_out, table[3], seeds, 3, guidance=guidance, clip=clip)
    d_x = dev(x, stream)
    kernels.step(stream, d_x, dev(model_out, stream), dev(table, stream), dev(np.array([3], np.int32), stream),
                 dev(seeds, stream), b, per_image, guidance, clip)
    np.testing.assert_array_equal(d_x.download(stream), expected)


@pytest.mark.parametrize("dtype", ["int64", "float32"])
def test_set_timesteps_and_advance(gpu, dtype):
    kernels, stream = gpu
    table = np.array([981, 961, 941, 1], dtype=np.int64)
    index = dev(np.array([0], np.int32), stream)
    kernels.advance(stream, index)
    kernels.advance(stream, index)
    out = dev(np.zeros(6, dtype), stream)
    kernels.set_timesteps(stream, out, dev(table, stream), index, 6, dtype)
    assert index.download(stream).tolist() == [2]
    np.testing.assert_array_equal(out.download(stream), np.full(6, 941, dtype))
