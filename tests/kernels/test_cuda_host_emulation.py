"""kernels/step.cu compiled as host C++ (g++; CUDA built-ins emulated, threads run in turn) against the C kernel.

Checks the CUDA twin's indexing, grid-stride loops, partial quads, guidance halves, table/step-counter reads
and the timestep kernels without a GPU. Same expressions, no FP contraction: results must be bit-identical.
"""
import ctypes
import shutil
import subprocess

import numpy as np
import pytest

import ddengine.kernels
from ddengine import _kernels
from test_cuda_compile import KERNELS

LAUNCHERS = r"""
#define __global__
struct dd_dim3 { unsigned x, y, z; };
static dd_dim3 blockIdx, blockDim, threadIdx, gridDim;
#include "step.cu"
#define DD_LAUNCH(grid, block, call)                                              \
    do {                                                                          \
        gridDim.x = (grid), blockDim.x = (block);                                 \
        for (blockIdx.x = 0; blockIdx.x < gridDim.x; blockIdx.x++)               \
            for (threadIdx.x = 0; threadIdx.x < blockDim.x; threadIdx.x++)        \
                call;                                                             \
    } while (0)
typedef unsigned long long u64;
extern "C" void step(int g, int b, float *x, const float *mo, const float *table, const int *index,
                     const u64 *seeds, int batch, long long per_image, int guided, float guidance, float clip)
{ DD_LAUNCH(g, b, ddstep_step(x, mo, table, index, seeds, batch, per_image, guided, guidance, clip)); }
extern "C" void fill_noise(int g, int b, float *out, const u64 *seeds, int batch, long long per_image)
{ DD_LAUNCH(g, b, ddstep_fill_noise(out, seeds, batch, per_image)); }
extern "C" void set_i64(int g, int b, long long *t, const long long *table, const int *index, int n)
{ DD_LAUNCH(g, b, ddstep_set_timesteps_i64(t, table, index, n)); }
extern "C" void set_f32(int g, int b, float *t, const long long *table, const int *index, int n)
{ DD_LAUNCH(g, b, ddstep_set_timesteps_f32(t, table, index, n)); }
extern "C" void advance(int g, int b, int *index) { DD_LAUNCH(g, b, ddstep_advance(index)); }
"""


@pytest.fixture(scope="module")
def host_cuda(tmp_path_factory):
    if shutil.which("g++") is None:
        pytest.skip("g++ is not on PATH")
    folder = tmp_path_factory.mktemp("host_cuda")
    (folder / "launch.cpp").write_text(LAUNCHERS)
    lib = folder / "host_step.so"
    subprocess.run(["g++", "-shared", "-fPIC", "-O2", "-ffp-contract=off", f"-I{KERNELS}", str(folder / "launch.cpp"),
                    "-o", str(lib)], check=True, capture_output=True, timeout=300)
    return ctypes.CDLL(str(lib))


def ptr(a):
    return a.ctypes.data_as(ctypes.c_void_p)


@pytest.mark.parametrize("guidance", [None, 7.5])
@pytest.mark.parametrize("clip", [None, 1.0])
@pytest.mark.parametrize("sigma", [0.0, 0.8])
@pytest.mark.parametrize("grid, block", [(1, 1), (3, 7)])
def test_step_kernel_equals_c_kernel(host_cuda, guidance, clip, sigma, grid, block):
    rng = np.random.default_rng(21)
    batch, shape = 3, (7, 11, 13)  # 1001 elements per image: a partial last quad
    x = rng.standard_normal((batch,) + shape).astype(np.float32)
    model_out = rng.standard_normal(((2 if guidance else 1) * batch,) + shape).astype(np.float32)
    table = rng.uniform(-1.5, 1.5, (4, 9)).astype(np.float32)
    table[:, 8] = sigma
    seeds = rng.integers(0, 2**64, batch, dtype=np.uint64)
    index = np.array([2], np.int32)
    y = x.copy()
    host_cuda.step(grid, block, ptr(y), ptr(model_out), ptr(table), ptr(index), ptr(seeds), batch,
                   ctypes.c_longlong(x[0].size), int(guidance is not None), ctypes.c_float(guidance or 0.0),
                   ctypes.c_float(clip or 0.0))
    _kernels.step(x, model_out, table[2], seeds, 2, guidance=guidance, clip=clip)
    assert np.array_equal(y.view(np.uint32), x.view(np.uint32))


def test_fill_noise_and_counter_kernels(host_cuda):
    seeds = np.array([0, 5, 2**64 - 1], np.uint64)
    want, got = np.empty((3, 1003), np.float32), np.zeros((3, 1003), np.float32)
    _kernels.fill_noise(want, seeds)
    host_cuda.fill_noise(2, 5, ptr(got), ptr(seeds), 3, ctypes.c_longlong(1003))
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))

    t_table, index = np.array([999, 500, 1], np.int64), np.array([1], np.int32)
    t64, t32 = np.zeros(6, np.int64), np.zeros(6, np.float32)
    host_cuda.set_i64(2, 2, ptr(t64), ptr(t_table), ptr(index), 6)
    host_cuda.set_f32(1, 4, ptr(t32), ptr(t_table), ptr(index), 6)
    host_cuda.advance(2, 3, ptr(index))
    assert t64.tolist() == [500] * 6 and t32.tolist() == [500.0] * 6 and index[0] == 2
