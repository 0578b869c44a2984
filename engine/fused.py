"""The Python mirror of kernels/ddstep.h: the per-image record, the launch params struct, and the launch calls.

`ddengine._kernels` checks only what memory safety needs; what else a launch assumes (finite coefficient rows,
guidance, clip) is established once, where plans and requests are made (engine/plan.py, engine/requests.py).
"""
import ctypes

import numpy as np

from ddengine import _kernels

# kernels/ddstep.h dd_image: one image of a step (its row, noise counter, guidance; `bad` is written by the kernel).
IMAGE_DTYPE = np.dtype({"names": ["seed", "row", "step", "uncond", "guidance", "bad"],
                        "formats": ["<u8", "<i4", "<u4", "<i4", "<f4", "<i4"],
                        "offsets": [0, 8, 12, 16, 20, 24], "itemsize": 32})
NO_UNCOND = -1  # dd_image.uncond of an image without guidance
NOT_BAD = -1  # dd_image.bad of an image that stayed finite


class StepArgs(ctypes.Structure):
    """kernels/ddstep.h dd_step_args, the one argument of every step.cu kernel (device addresses)."""

    _fields_ = [("x", ctypes.c_void_p), ("model_out", ctypes.c_void_p), ("table", ctypes.c_void_p),
                ("images", ctypes.c_void_p), ("batch", ctypes.c_longlong), ("per_image", ctypes.c_longlong),
                ("clip", ctypes.c_float), ("unused", ctypes.c_int)]


def image_records(seeds, *, row=0, uncond=NO_UNCOND, guidance=0.0):
    """One dd_image per seed, at table row `row` and noise step 0; `uncond`/`guidance` scalars or per image."""
    seeds = np.asarray(seeds, dtype=np.uint64)
    images = np.zeros(len(seeds), dtype=IMAGE_DTYPE)
    images["seed"], images["row"], images["step"] = seeds, row, 0
    images["uncond"], images["guidance"], images["bad"] = uncond, guidance, NOT_BAD
    return images


def fill_noise(x, seeds, threads=0):
    """x <- x_T, the initial noise of each image's seed (Philox domain 1)."""
    _kernels.fill_noise(x, seeds, threads=threads)


def step(x, model_out, table, images, clip=None, threads=0):
    """One fused step of every image in place (kernels/ddstep.h); images["bad"] records non-finite steps."""
    _kernels.step(x, model_out, table, images, clip=0.0 if clip is None else clip, threads=threads)


def advance(images):
    """Every image moves to its next coefficient row and noise counter (step.cu ddstep_advance)."""
    images["row"] += 1
    images["step"] += 1
