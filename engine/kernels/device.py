"""The device side of the step kernel: kernels/step.cu compiled by NVRTC (engine/gpu/nvrtc.py), its five entry
points loaded into a device's primary context and launched on a given stream.

ddstep_step and ddstep_fill_noise take the one params struct (engine/kernels/host.py StepArgs, kernels/step.h),
passed by value; the timestep and advance kernels read the per-image records (IMAGE_DTYPE) on the device.
"""

import ctypes
import importlib.resources
import threading
from pathlib import Path

from ddengine.gpu import driver, nvrtc
from ddengine.gpu.driver import CudaError, check, device_arch, use_device
from ddengine.gpu.nvrtc import load_target, nvrtc_version
from ddengine.kernels.host import StepArgs

KERNEL_FILES = ("step.cu", "step.h", "philox.h")  # the main source first
ENTRY_POINTS = (
    "ddstep_step",
    "ddstep_fill_noise",
    "ddstep_set_timesteps_i64",
    "ddstep_set_timesteps_f32",
    "ddstep_advance",
)
BLOCK = 256
QUAD = 4  # one thread per quad of 4 elements (one Philox block)

_loaded = {}  # device ordinal -> StepKernels
_lock = threading.Lock()


def kernel_dir():
    """The folder of step.cu, step.h and philox.h: kernels/, package data of ddengine.kernels as `source`."""
    return Path(str(importlib.resources.files("ddengine.kernels").joinpath("source")))


def source_hash(folder=None):
    return nvrtc.source_hash(folder or kernel_dir(), KERNEL_FILES)


def compile_step(arch, target="cubin", folder=None):
    """step.cu as PTX text or a cubin for one architecture, compiled now."""
    return nvrtc.compile_source(folder or kernel_dir(), KERNEL_FILES[0], arch, target)


def cache_key(arch, target, folder=None):
    return nvrtc.cache_key(folder or kernel_dir(), KERNEL_FILES, arch, target)


def compiled_step(arch, target="cubin", folder=None):
    """step.cu's image for one architecture, compiled once and cached (engine/gpu/nvrtc.py compiled)."""
    return nvrtc.compiled(folder or kernel_dir(), KERNEL_FILES, arch, target)


class StepKernels:
    """step.cu's entry points in one device's primary context; every launch goes on a given stream."""

    def __init__(self, device=0, folder=None):
        cu, _, _ = driver.import_cuda()
        use_device(device)
        self.device, self.arch = device, device_arch(device)
        target, arch = load_target(self.arch)
        image = compiled_step(arch, target, folder)
        try:
            self.module = check(cu.cuModuleLoadData(image))
        except CudaError as err:
            driver_version = check(cu.cuDriverGetVersion())
            raise CudaError(
                f"cannot load the step kernel compiled by NVRTC {nvrtc_version()} for sm_{self.arch} "
                f"into driver {driver_version // 1000}.{driver_version % 1000 // 10}: {err}"
            ) from None
        self.functions = {name: check(cu.cuModuleGetFunction(self.module, name.encode())) for name in ENTRY_POINTS}

    def _launch(self, name, threads, stream, *args):
        cu, _, _ = driver.import_cuda()
        grid = max(1, (threads + BLOCK - 1) // BLOCK)
        pointers = (ctypes.c_void_p * len(args))(*[ctypes.addressof(a) for a in args])
        check(
            cu.cuLaunchKernel(
                self.functions[name],
                grid,
                1,
                1,
                BLOCK,
                1,
                1,
                0,
                cu.CUstream(int(stream)),
                ctypes.addressof(pointers),
                0,
            )
        )

    def step(self, stream, args):
        """x <- step(x, model_out) in place for every image of `args` (a StepArgs of device addresses)."""
        self._launch("ddstep_step", args.batch * quads(args.per_image), stream, args)

    def fill_noise(self, stream, args):
        """args.x <- x_T: the initial normals of each image's seed (Philox domain 1)."""
        self._launch("ddstep_fill_noise", args.batch * quads(args.per_image), stream, args)

    def set_timesteps(self, stream, t_out, t_table, images, batch, dtype):
        """t_out[j] and t_out[uncond_j] <- t_table[row_j] as int64 or float32 (the model's timestep input)."""
        name = {"int64": "ddstep_set_timesteps_i64", "float32": "ddstep_set_timesteps_f32"}[dtype]
        self._launch(name, batch, stream, _ptr(t_out), _ptr(t_table), _ptr(images), ctypes.c_int(batch))

    def advance(self, stream, images, batch):
        """Every image's row and noise counter += 1 on the device (so a captured graph replays the next step)."""
        self._launch("ddstep_advance", batch, stream, _ptr(images), ctypes.c_int(batch))


def step_args(x, model_out, table, images, batch, per_image, slots=None, x0_out=None):
    """A StepArgs of device addresses (slots: each image's L, H0, H1, H2; x0_out: where x0 goes; 0 = none)."""
    return StepArgs(
        int(x), int(model_out or 0), int(table or 0), int(images), int(slots or 0), int(x0_out or 0), batch, per_image
    )


def quads(per_image):
    return (per_image + QUAD - 1) // QUAD


def _ptr(address):
    return ctypes.c_void_p(int(address))


def step_kernels(device=0):
    """The StepKernels of `device`, loaded once per process."""
    with _lock:
        kernels = _loaded.get(device)
    if kernels is None:
        kernels = StepKernels(device)
        with _lock:
            kernels = _loaded.setdefault(device, kernels)
    return kernels
