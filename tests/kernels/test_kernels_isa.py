"""The SIMD variants of ddengine.kernels._step agree bit for bit with its portable build (no ISA clones, scalar Philox)."""

import importlib.util
import platform
import shutil
import subprocess
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from ddengine.kernels import _step
from ddengine.kernels.host import image_records
from tests.support.kernel_oracle import single_step_rows

# step_host.c is not package data: build from the checkout these tests live in (the installed module was too)
KERNELS = Path(__file__).resolve().parents[2] / "kernels"
VARIANTS = {"portable": ["-DDD_NO_CLONES"], "avx2_philox": ["-DDD_NO_AVX512"]}


def build(tmp_path, defines):
    """Compiles kernels/step_host.c with setup.py's flags plus `defines` into tmp_path; returns a Popen."""
    out = tmp_path / ("_step" + sysconfig.get_config_var("EXT_SUFFIX"))
    cmd = [
        "gcc",
        "-shared",
        "-fPIC",
        "-O3",
        "-std=c11",
        "-fno-wrapv",
        "-ffp-contract=off",
        "-fno-math-errno",
        "-pthread",
        *defines,
        f"-I{sysconfig.get_paths()['include']}",
        f"-I{KERNELS}",
        str(KERNELS / "step_host.c"),
        "-o",
        str(out),
    ]
    return out, subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def load(path):
    spec = importlib.util.spec_from_file_location("ddengine.kernels._step", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    return noise.view(np.uint32), x.view(np.uint32)


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
