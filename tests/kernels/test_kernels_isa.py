"""The SIMD variants of ddengine.kernels._step agree bit for bit with its portable build (no ISA clones, scalar Philox)."""

import platform
import shutil

import numpy as np
import pytest

from ddengine.core.plan import make_plan
from ddengine.core.rows import SLOTS
from ddengine.kernels import _step
from ddengine.kernels.host import image_records
from tests.kernels.kernel_builds import build, load
from tests.support.kernel_oracle import single_step_rows

VARIANTS = {"portable": ["-DDD_NO_CLONES"], "avx2_philox": ["-DDD_NO_AVX512"]}


def multistep_outputs(k):
    """x and the slots after one step of images at rows of a UniPC, a DPM-Solver++(3M) and a PLMS plan (the shaped
    bodies of kernels/step.h, guided or not)."""
    tables = [
        make_plan({"num_train_timesteps": 1000}, 10, method=m).rows_float32() for m in ("unipc", "dpmpp-3m", "plms")
    ]
    table = np.concatenate(tables)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((6, 4099)).astype(np.float32)
    model_out = rng.standard_normal((9, 4099)).astype(np.float32)
    slots = rng.standard_normal((6, SLOTS, 4099)).astype(np.float32)
    images = image_records(np.arange(6, dtype=np.uint64), uncond=[6, -1, 7, -1, 8, -1], guidance=3.0)
    images["row"] = [1, 5, 10 + 2, 10 + 6, 20 + 0, 20 + 7]
    k.step(x, model_out, table, images, slots=slots)
    return x.view(np.uint32), slots.view(np.uint32)


def outputs(k):
    seeds = np.arange(5, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
    noise = np.empty((5, 30001), np.float32)
    k.fill_noise(noise, seeds)
    x = np.linspace(-2, 2, noise.size, dtype=np.float32).reshape(noise.shape)
    model_out = np.concatenate([np.cos(x), 0.5 * np.sin(x[:3])])
    table = single_step_rows(
        [[1.1, -0.3, 0.2, 0.9, -0.1, 0.7, 0.2, -0.4, 0.35], [0.9, 0.1, 0, 1, 0, 0.8, 0.1, 0.3, 0]], clip=1.5
    )
    images = image_records(seeds, uncond=[5, 6, 7, -1, -1], guidance=[4.0, 1.5, 7.0, 0, 0])
    images["row"], images["step"] = [0, 1, 0, 1, 0], [12, 3, 0, 999, 2**31]
    k.step(x, model_out, table, images)
    return (noise.view(np.uint32), x.view(np.uint32), *multistep_outputs(k))


@pytest.mark.slow
@pytest.mark.skipif(platform.machine() != "x86_64" or shutil.which("gcc") is None, reason="needs gcc on x86_64")
def test_simd_variants_are_bit_identical(tmp_path):
    jobs = {}
    for name, defines in VARIANTS.items():
        (tmp_path / name).mkdir()
        jobs[name] = build(tmp_path / name, defines)
    want = outputs(_step)
    for name, (path, proc) in jobs.items():
        log = proc.communicate(timeout=300)[0].decode(errors="replace")
        assert proc.returncode == 0, log
        for got, ref in zip(outputs(load(path)), want):
            assert np.array_equal(got, ref), name
