"""kernels/step.cu compiled as host C++ (tests/support/host_cuda.py) against the C kernel, without a GPU.

Checks the CUDA twin's indexing, grid-stride loops, partial quads, per-image rows/steps/guidance, the
non-finite record and the timestep/advance kernels. Same expressions, no FP contraction: bit-identical.
"""

import ctypes

import numpy as np
import pytest

from ddengine.core.plan import make_plan
from ddengine.core.rows import SLOTS
from ddengine.kernels import _step
from ddengine.kernels.host import StepArgs, fill_noise, image_records
from tests.support.host_cuda import build_host_cuda, launch
from tests.support.kernel_oracle import random_step_case


@pytest.fixture(scope="module")
def host_cuda(tmp_path_factory):
    return build_host_cuda(tmp_path_factory.mktemp("host_cuda"))


def args_for(x, model_out, table, images, slots=None, x0_out=None):
    pointer = lambda a: 0 if a is None else a.ctypes.data  # noqa: E731
    return StepArgs(
        x.ctypes.data, model_out.ctypes.data, table.ctypes.data, images.ctypes.data, pointer(slots), pointer(x0_out),
        len(x), x[0].size,
    )  # fmt: skip


@pytest.mark.parametrize("clip", [0.0, 1.0])
@pytest.mark.parametrize("sigma", [0.0, 0.8])
@pytest.mark.parametrize("multistep", [False, True])
@pytest.mark.parametrize("grid, block", [(1, 1), (3, 7)])
def test_step_kernel_equals_c_kernel(host_cuda, clip, sigma, multistep, grid, block):
    rng = np.random.default_rng(21)
    case = random_step_case(rng, 5, (7, 11, 13), sigma=sigma, clip=clip, tables=6, multistep=multistep)  # 1001 elements
    x, model_out, table, images = case[:4]
    slots = case[4] if multistep else None
    model_out[2, 1, 5, 6] = np.nan  # image 2 is recorded as bad by both
    y, cuda_images, x0, cuda_x0 = x.copy(), images.copy(), np.zeros_like(x), np.zeros_like(x)
    cuda_slots = None if slots is None else slots.copy()
    launch(host_cuda, "ddstep_step", grid, block, args_for(y, model_out, table, cuda_images, cuda_slots, cuda_x0))
    _step.step(x, model_out, table, images, slots=slots, x0_out=x0)
    assert np.array_equal(y.view(np.uint32), x.view(np.uint32))
    assert np.array_equal(cuda_x0.view(np.uint32), x0.view(np.uint32))
    if multistep:
        assert np.array_equal(cuda_slots.view(np.uint32), slots.view(np.uint32))
    assert np.array_equal(cuda_images, images) and images["nonfinite_step"][2] == images["step"][2].astype(np.int32)


@pytest.mark.parametrize("keep_x0", [False, True])
@pytest.mark.parametrize("guided", [False, True])
def test_step_kernel_equals_c_kernel_on_solver_rows(host_cuda, keep_x0, guided):
    """Every row of each multistep solver's plan at once: the CUDA twin picks the C kernel's shapes (kernels/step.h
    dd_step_shape) and evaluates the same terms, NaN and inf inputs included."""
    rng = np.random.default_rng([keep_x0, guided])
    for method in ("dpmpp-2m", "dpmpp-3m", "unipc", "plms"):
        table = make_plan({"num_train_timesteps": 1000, "clip_sample": guided}, 9, method=method).rows_float32()
        batch, n = len(table), 203
        x = rng.standard_normal((batch, n)).astype(np.float32)
        model_out = rng.standard_normal((2 * batch if guided else batch, n)).astype(np.float32)
        slots = rng.standard_normal((batch, SLOTS, n)).astype(np.float32)
        for a in (x, model_out, slots):  # inf: the general body's 0 * inf would make NaN where a shaped one has inf
            bad = rng.random(a.shape) < 0.004
            a[bad] = rng.choice(np.array([np.nan, np.inf, -np.inf], np.float32), int(bad.sum()))
        images = image_records(np.arange(batch, dtype=np.uint64), uncond=np.arange(batch) + batch if guided else -1)
        images["row"], images["guidance"] = np.arange(batch), 2.5
        y, cuda_images, cuda_slots = x.copy(), images.copy(), slots.copy()
        x0, cuda_x0 = (np.zeros_like(x), np.zeros_like(x)) if keep_x0 else (None, None)
        launch(host_cuda, "ddstep_step", 2, 9, args_for(y, model_out, table, cuda_images, cuda_slots, cuda_x0))
        _step.step(x, model_out, table, images, slots=slots, x0_out=x0)
        assert np.array_equal(y.view(np.uint32), x.view(np.uint32)), method
        assert np.array_equal(cuda_slots.view(np.uint32), slots.view(np.uint32)), method
        if keep_x0:
            assert np.array_equal(cuda_x0.view(np.uint32), x0.view(np.uint32)), method
        assert np.array_equal(cuda_images, images) and (images["nonfinite_step"] == 0).any(), method


def test_fill_noise_and_counter_kernels(host_cuda):
    seeds = np.array([0, 5, 2**64 - 1], np.uint64)
    want, got = np.empty((3, 1003), np.float32), np.zeros((3, 1003), np.float32)
    _step.fill_noise(want, seeds)
    images = image_records(seeds, uncond=[3, -1, 4], guidance=2.0)
    launch(host_cuda, "ddstep_fill_noise", 2, 5, StepArgs(got.ctypes.data, 0, 0, images.ctypes.data, 0, 0, 3, 1003))
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))
    images["noise_scale"] = 0.75  # Euler's init_noise_sigma on the engine's x, as the host's fill_noise applies it
    scaled = np.empty_like(want)
    fill_noise(scaled, seeds, noise_scale=0.75)
    launch(host_cuda, "ddstep_fill_noise", 2, 5, StepArgs(got.ctypes.data, 0, 0, images.ctypes.data, 0, 0, 3, 1003))
    assert np.array_equal(got.view(np.uint32), scaled.view(np.uint32))

    t_table = np.array([999, 500, 1], np.int64)
    images["row"] = [1, 2, 0]
    t64, t32 = np.zeros(5, np.int64), np.zeros(5, np.float32)
    pointer = lambda a: ctypes.c_void_p(a.ctypes.data)  # noqa: E731
    launch(
        host_cuda, "ddstep_set_timesteps_i64", 2, 2, pointer(t64), pointer(t_table), pointer(images), ctypes.c_int(3)
    )
    launch(
        host_cuda, "ddstep_set_timesteps_f32", 1, 4, pointer(t32), pointer(t_table), pointer(images), ctypes.c_int(3)
    )
    launch(host_cuda, "ddstep_advance", 2, 3, pointer(images), ctypes.c_int(3))
    assert t64.tolist() == [500, 1, 999, 500, 999]  # own rows, then the unconditional rows 3 and 4
    assert t32.tolist() == [500.0, 1.0, 999.0, 500.0, 999.0]
    assert images["row"].tolist() == [2, 3, 1] and images["step"].tolist() == [1, 1, 1]
