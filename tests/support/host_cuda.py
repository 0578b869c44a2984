"""kernels/step.cu compiled as host C++ (g++): CUDA built-ins emulated, the grid's threads run in turn.

Every entry point gets a trampoline `launch_<name>(grid, block, params)` taking cuLaunchKernel's parameter
array (one pointer per argument), so tests and the CUDA emulator run the CUDA twin's own code on the CPU.
"""

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

KERNELS = Path(__file__).resolve().parents[2] / "kernels"
ENTRY_POINTS = (
    "ddstep_step",
    "ddstep_fill_noise",
    "ddstep_set_timesteps_i64",
    "ddstep_set_timesteps_f32",
    "ddstep_advance",
)

SOURCE = r"""
#define __global__
#define __device__
struct dd_dim3 { unsigned x, y, z; };
static dd_dim3 blockIdx, blockDim, threadIdx, gridDim;
static int atomicCAS(int *address, int compare, int value)
{
    int old = *address;
    if (old == compare)
        *address = value;
    return old;
}
#include "step.cu"
#define DD_LAUNCH(grid, block, call)                                              \
    do {                                                                          \
        gridDim.x = (grid), blockDim.x = (block);                                 \
        for (blockIdx.x = 0; blockIdx.x < gridDim.x; blockIdx.x++)               \
            for (threadIdx.x = 0; threadIdx.x < blockDim.x; threadIdx.x++)        \
                call;                                                             \
    } while (0)
#define ARG(i, type) (*(type *)params[i])
extern "C" void launch_ddstep_step(int g, int b, void **params)
{ DD_LAUNCH(g, b, ddstep_step(ARG(0, dd_step_args))); }
extern "C" void launch_ddstep_fill_noise(int g, int b, void **params)
{ DD_LAUNCH(g, b, ddstep_fill_noise(ARG(0, dd_step_args))); }
extern "C" void launch_ddstep_set_timesteps_i64(int g, int b, void **params)
{ DD_LAUNCH(g, b, ddstep_set_timesteps_i64(ARG(0, dd_i64 *), ARG(1, const dd_i64 *), ARG(2, const dd_image *), ARG(3, int))); }
extern "C" void launch_ddstep_set_timesteps_f32(int g, int b, void **params)
{ DD_LAUNCH(g, b, ddstep_set_timesteps_f32(ARG(0, float *), ARG(1, const dd_i64 *), ARG(2, const dd_image *), ARG(3, int))); }
extern "C" void launch_ddstep_advance(int g, int b, void **params)
{ DD_LAUNCH(g, b, ddstep_advance(ARG(0, dd_image *), ARG(1, int))); }
"""


def build_host_cuda(folder):
    """Compile the trampolines + step.cu into folder/host_step.so and load it (pytest.skip without g++)."""
    if shutil.which("g++") is None:
        pytest.skip("g++ is not on PATH")
    folder = Path(folder)
    (folder / "launch.cpp").write_text(SOURCE)
    lib = folder / "host_step.so"
    subprocess.run(
        [
            "g++",
            "-shared",
            "-fPIC",
            "-O2",
            "-std=c++17",
            "-ffp-contract=off",
            f"-I{KERNELS}",
            str(folder / "launch.cpp"),
            "-o",
            str(lib),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    library = ctypes.CDLL(str(lib))
    for name in ENTRY_POINTS:
        getattr(library, f"launch_{name}").argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
    return library


def launch(library, name, grid, block, *args):
    """Run entry point `name` over a grid with ctypes arguments, as cuLaunchKernel would pass them."""
    params = (ctypes.c_void_p * len(args))(*[ctypes.addressof(a) for a in args])
    getattr(library, f"launch_{name}")(grid, block, ctypes.addressof(params))
