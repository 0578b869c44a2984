"""The CUDA twin kernels/step.cu: compiles (nvcc -ptx, NVRTC) and, on a GPU, matches the C kernel."""
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import ddengine.kernels
from ddengine import _kernels
from kernel_oracle import rel_err

KERNELS = Path(ddengine.kernels.__file__).resolve().parent
SOURCE = KERNELS / "step.cu"
ENTRY_POINTS = ("ddstep_step", "ddstep_fill_noise", "ddstep_set_timesteps_i64", "ddstep_set_timesteps_f32",
                "ddstep_advance")


def entries(ptx):
    return {line.split()[2].rstrip("(") for line in ptx.splitlines() if line.startswith(".visible .entry")}


@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_nvcc_compiles_all_entry_points(arch, tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH")
    out = tmp_path / f"step_{arch}.ptx"
    subprocess.run([nvcc, "-ptx", f"-arch={arch}", "--fmad=false", f"-I{KERNELS}", str(SOURCE), "-o", str(out)],
                   check=True, capture_output=True, timeout=300)
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


def have_gpu():
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return False
    try:
        return subprocess.run([smi, "-L"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture(scope="module")
def cuda_module():
    if not have_gpu():
        pytest.skip("no NVIDIA GPU (nvidia-smi -L failed or is missing)")
    cupy = pytest.importorskip("cupy", reason="cupy is not installed")
    return cupy, cupy.RawModule(code=SOURCE.read_text(), options=("--fmad=false", f"-I{KERNELS}"))


def launch(mod, name, total, *args):
    block = 256
    mod.get_function(name)(((total + block - 1) // block,), (block,), args)


@pytest.mark.gpu
@pytest.mark.parametrize("guidance", [None, 7.5])
@pytest.mark.parametrize("clip", [None, 1.0])
def test_cuda_step_matches_c_kernel(cuda_module, guidance, clip):
    cp, mod = cuda_module
    rng = np.random.default_rng(11)
    batch, shape = 5, (3, 17, 19)  # 969 elements per image: a partial quad
    x = rng.standard_normal((batch,) + shape).astype(np.float32)
    model_out = rng.standard_normal(((2 if guidance else 1) * batch,) + shape).astype(np.float32)
    table = rng.uniform(-1.5, 1.5, (4, 9)).astype(np.float32)
    seeds = rng.integers(0, 2**64, batch, dtype=np.uint64)
    step = 2
    x_d, index_d = cp.asarray(x), cp.asarray(np.array([step], np.int32))
    per_image = x[0].size
    launch(mod, "ddstep_step", batch * ((per_image + 3) // 4), x_d, cp.asarray(model_out), cp.asarray(table), index_d,
           cp.asarray(seeds), np.int32(batch), np.int64(per_image), np.int32(guidance is not None),
           np.float32(guidance or 0.0), np.float32(clip or 0.0))
    _kernels.step(x, model_out, table[step], seeds, step, guidance=guidance, clip=clip)
    assert rel_err(cp.asnumpy(x_d), x) < 1e-6


@pytest.mark.gpu
def test_cuda_fill_noise_and_counters_match(cuda_module):
    cp, mod = cuda_module
    seeds = np.array([0, 3, 2**63 + 1], np.uint64)
    out = np.empty((3, 1001), np.float32)
    _kernels.fill_noise(out, seeds)
    out_d = cp.empty_like(cp.asarray(out))
    launch(mod, "ddstep_fill_noise", 3 * 251, out_d, cp.asarray(seeds), np.int32(3), np.int64(1001))
    assert rel_err(cp.asnumpy(out_d), out) < 1e-6

    t_table = np.array([999, 500, 1], np.int64)
    index_d = cp.asarray(np.array([1], np.int32))
    t64, t32 = cp.zeros(6, cp.int64), cp.zeros(6, cp.float32)
    launch(mod, "ddstep_set_timesteps_i64", 6, t64, cp.asarray(t_table), index_d, np.int32(6))
    launch(mod, "ddstep_set_timesteps_f32", 6, t32, cp.asarray(t_table), index_d, np.int32(6))
    launch(mod, "ddstep_advance", 1, index_d)
    assert cp.asnumpy(t64).tolist() == [500] * 6 and cp.asnumpy(t32).tolist() == [500.0] * 6
    assert int(cp.asnumpy(index_d)[0]) == 2
