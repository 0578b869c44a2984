"""The Python mirror of kernels/step.h: the per-image record, the launch params struct, and the launch calls.

`ddengine.kernels._step` checks only what memory safety needs; what else a launch assumes (finite coefficient rows,
guidance, clip) is established once, where plans and requests are made (engine/core/plan.py, engine/runtime/params.py).
"""

import ctypes

import numpy as np

from ddengine.core.guidance import NO_UNCOND
from ddengine.kernels import _step

# kernels/step.h dd_image: one image of a step (its row, noise counter, guidance; the kernel writes nonfinite_step).
IMAGE_DTYPE = np.dtype(
    {
        "names": ["seed", "row", "step", "uncond", "guidance", "nonfinite_step", "noise_scale"],
        "formats": ["<u8", "<i4", "<u4", "<i4", "<f4", "<i4", "<f4"],
        "offsets": [0, 8, 12, 16, 20, 24, 28],
        "itemsize": 32,
    }
)
STAYED_FINITE = -1  # dd_image.nonfinite_step of an image whose every step was finite


class StepArgs(ctypes.Structure):
    """kernels/step.h dd_step_args, the one argument of every step.cu kernel (device addresses)."""

    _fields_ = [
        ("x", ctypes.c_void_p),
        ("model_out", ctypes.c_void_p),
        ("table", ctypes.c_void_p),
        ("images", ctypes.c_void_p),
        ("slots", ctypes.c_void_p),
        ("x0_out", ctypes.c_void_p),
        ("batch", ctypes.c_longlong),
        ("per_image", ctypes.c_longlong),
    ]


def image_records(seeds, *, row=0, uncond=NO_UNCOND, guidance=0.0, noise_scale=1.0):
    """One dd_image per seed, at table row `row` and noise step 0; `uncond`/`guidance` scalars or per image."""
    seeds = np.asarray(seeds, dtype=np.uint64)
    images = np.zeros(len(seeds), dtype=IMAGE_DTYPE)
    images["seed"], images["row"], images["step"] = seeds, row, 0
    images["uncond"], images["guidance"], images["nonfinite_step"] = uncond, guidance, STAYED_FINITE
    images["noise_scale"] = noise_scale
    return images


def fill_noise(x, seeds, threads=0, noise_scale=1.0):
    """x <- noise_scale x_T, the initial noise of each image's seed (Philox domain 1), as step.cu ddstep_fill_noise."""
    _step.fill_noise(x, seeds, threads=threads)
    if noise_scale != 1.0:
        np.multiply(x, np.float32(noise_scale), out=x)


def step(x, model_out, table, images, slots=None, x0_out=None, threads=0):
    """One fused step of every image in place (kernels/step.h); images["nonfinite_step"] records the first non-finite one.
    slots (B, 4, ...): each image's L, H0, H1, H2 for multistep rows; x0_out (B, ...) receives this step's x0."""
    _step.step(x, model_out, table, images, slots=slots, x0_out=x0_out, threads=threads)


def row_shape(row, keep_x0=False):
    """The body a multistep coefficient row runs (kernels/step.h dd_step_shape, docs/math.md "Specialised bodies"):
    {has_s, kp0, kpx, kpe, nh, slots, zs, zy, general_body}; None for a single-step row."""
    return _step.row_shape(np.ascontiguousarray(row, dtype=np.float32), keep_x0=keep_x0)


def advance(images):
    """Every image moves to its next coefficient row and noise counter (step.cu ddstep_advance)."""
    images["row"] += 1
    images["step"] += 1
