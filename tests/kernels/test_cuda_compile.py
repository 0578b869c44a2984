"""The CUDA twin kernels/step.cu: compiles (nvcc -ptx, NVRTC) and, on a GPU, matches the C kernel."""

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import ddengine.kernels
from ddengine.kernels import _step
from ddengine.kernels.device import ENTRY_POINTS
from ddengine.kernels.host import image_records
from tests.support.gpu import needs_gpu
from tests.support.kernel_oracle import random_step_case, rel_err

KERNELS = Path(ddengine.kernels.__file__).resolve().parent / "source"  # kernels/, as installed
SOURCE = KERNELS / "step.cu"


def entries(ptx):
    return {line.split()[2].rstrip("(") for line in ptx.splitlines() if line.startswith(".visible .entry")}


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_nvcc_compiles_all_entry_points(arch, tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH")
    out = tmp_path / f"step_{arch}.ptx"
    subprocess.run(
        [nvcc, "-ptx", f"-arch={arch}", "--fmad=false", f"-I{KERNELS}", str(SOURCE), "-o", str(out)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    ptx = out.read_text()
    assert entries(ptx) == set(ENTRY_POINTS)
    # bitwise agreement with the C twin: no contraction, IEEE-rounded division and square root
    assert "fma.rn.f32" not in ptx and ".approx" not in ptx
    assert "div.rn.f32" in ptx and "sqrt.rn.f32" in ptx


def test_nvrtc_compiles_without_system_headers():
    nvrtc = pytest.importorskip("cuda.bindings.nvrtc", reason="cuda-python (cuda.bindings) is not installed")
    ok = nvrtc.nvrtcResult.NVRTC_SUCCESS
    status, prog = nvrtc.nvrtcCreateProgram(SOURCE.read_bytes(), b"step.cu", 0, [], [])
    assert status == ok
    try:
        options = [b"--fmad=false", b"-I" + str(KERNELS).encode(), b"--gpu-architecture=compute_80"]
        status = nvrtc.nvrtcCompileProgram(prog, len(options), options)[0]
        size = nvrtc.nvrtcGetProgramLogSize(prog)[1]
        log = b" " * size
        nvrtc.nvrtcGetProgramLog(prog, log)
        assert status == ok, log.decode(errors="replace")
        size = nvrtc.nvrtcGetPTXSize(prog)[1]
        ptx = b" " * size
        nvrtc.nvrtcGetPTX(prog, ptx)
    finally:
        nvrtc.nvrtcDestroyProgram(prog)
    assert entries(ptx.decode(errors="replace")) == set(ENTRY_POINTS)


@pytest.fixture(scope="module")
def device():
    """StepKernels on the first GPU (tests/support/gpu.py needs_gpu skips without one)."""
    from ddengine.kernels.device import step_kernels

    return step_kernels(0)


@pytest.mark.parametrize("clip", [None, 1.0])
@needs_gpu
def test_cuda_step_matches_c_kernel_and_noise_bits(device, clip):
    from ddengine.gpu.memory import DeviceArray, Stream
    from ddengine.kernels.device import step_args

    rng = np.random.default_rng(11)
    x, model_out, table, images = random_step_case(rng, 6, (3, 17, 19))  # 969 elements per image: a partial quad
    stream = Stream()
    buffers = [DeviceArray.from_host(a, stream) for a in (x, model_out, table, images)]
    device.step(stream, step_args(*(b.ptr for b in buffers), len(x), x[0].size, clip))
    got = buffers[0].download(stream)
    _step.step(x, model_out, table, images, clip=clip or 0.0)
    assert rel_err(got, x) < 1e-6
    # the noise alone (a sigma-only row) is bit-identical: the same integer Philox and float32 Box-Muller
    noise_row = np.zeros((1, 9), np.float32)
    noise_row[0, 8] = 1.0
    zeros, images["row"] = np.zeros_like(x), 0
    for b, a in zip(buffers, (zeros, zeros, noise_row, images)):
        b.upload(a, stream)
    device.step(stream, step_args(*(b.ptr for b in buffers), len(x), x[0].size, None))
    host = zeros.copy()
    _step.step(host, zeros.copy(), noise_row, images.copy())
    assert np.array_equal(buffers[0].download(stream).view(np.uint32), host.view(np.uint32))
    for b in buffers:
        b.free()
    stream.close()


@needs_gpu
def test_cuda_fill_noise_is_bit_identical(device):
    from ddengine.gpu.memory import DeviceArray, Stream
    from ddengine.kernels.device import step_args

    seeds = np.array([0, 3, 2**63 + 1], np.uint64)
    want = np.empty((3, 1001), np.float32)
    _step.fill_noise(want, seeds)
    stream = Stream()
    out, images = DeviceArray(want.shape, np.float32), DeviceArray.from_host(image_records(seeds), stream)
    device.fill_noise(stream, step_args(out.ptr, None, None, images.ptr, 3, 1001))
    assert np.array_equal(out.download(stream).view(np.uint32), want.view(np.uint32))
    out.free(), images.free(), stream.close()
