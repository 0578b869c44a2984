"""NVRTC compiles kernels/step.cu (no GPU needed): PTX for sm_80/sm_90 with every entry point and no FMA
contraction, a cubin, and the per-architecture disk cache keyed by source, arch and NVRTC version."""

import re
import shutil

import pytest

nvrtc = pytest.importorskip(
    "cuda.bindings.nvrtc", reason="needs cuda-python: pip install cuda-python nvidia-cuda-nvrtc", exc_type=ImportError
)

from ddengine.gpu import nvrtc as cuda_nvrtc  # noqa: E402
from ddengine.gpu.driver import CudaError, check  # noqa: E402
from ddengine.kernels import device as step_device  # noqa: E402
from ddengine.kernels.device import ENTRY_POINTS  # noqa: E402

try:
    cuda_nvrtc.nvrtc_version()
except Exception as err:  # the NVRTC shared library itself is missing
    pytest.skip(f"NVRTC library not loadable ({err}): pip install nvidia-cuda-nvrtc", allow_module_level=True)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DDENGINE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(cuda_nvrtc, "_images", {})
    return tmp_path / "cache" / "cuda"


@pytest.fixture
def kernels_copy(tmp_path):
    folder = tmp_path / "kernels"
    folder.mkdir()
    for name in step_device.KERNEL_FILES:
        shutil.copy(step_device.kernel_dir() / name, folder / name)
    return folder


@pytest.mark.parametrize("arch", [80, 90])
def test_ptx_for_each_architecture(arch):
    ptx = step_device.compile_step(arch, "ptx").decode()
    assert re.search(rf"^\.target sm_{arch}\b", ptx, re.M)
    entries = re.findall(r"\.entry (\w+)\(", ptx)
    assert sorted(entries) == sorted(ENTRY_POINTS)
    # --fmad=false: no contraction into fma, so the CUDA twin rounds like the C kernel (-ffp-contract=off).
    assert "fma.rn.f32" not in ptx and "mul.rn.f32" in ptx


def test_cubin_for_sm90_is_an_elf_image():
    assert step_device.compile_step(90, "cubin")[:4] == b"\x7fELF"


def test_compiled_once_then_served_from_disk(cache, monkeypatch):
    image = step_device.compiled_step(86)
    files = list(cache.iterdir())
    assert len(files) == 1 and files[0].read_bytes() == image
    assert re.fullmatch(r"step-[0-9a-f]{20}-cubin_86-nvrtc\d+\.\d+-[0-9a-f]{8}\.cubin", files[0].name)

    def no_compile(*args, **kw):
        raise AssertionError("NVRTC ran although the image was cached")

    monkeypatch.setattr(cuda_nvrtc, "compile_source", no_compile)
    monkeypatch.setattr(cuda_nvrtc, "_images", {})  # a new process: memory cache empty, disk cache kept
    assert step_device.compiled_step(86) == image


def test_cache_key_follows_source_arch_and_nvrtc(kernels_copy, monkeypatch):
    key = step_device.cache_key(90, "cubin", kernels_copy)
    assert step_device.cache_key(80, "cubin", kernels_copy) != key
    (kernels_copy / "philox.h").write_text((kernels_copy / "philox.h").read_text() + "\n/* changed */\n")
    assert step_device.cache_key(90, "cubin", kernels_copy) != key
    changed = step_device.cache_key(90, "cubin", kernels_copy)
    monkeypatch.setattr(cuda_nvrtc, "nvrtc_version", lambda: (99, 1))
    assert step_device.cache_key(90, "cubin", kernels_copy) != changed


def test_compile_error_carries_the_nvrtc_log(kernels_copy):
    (kernels_copy / "step.cu").write_text(
        '#include "step.h"\nextern "C" __global__ void k(float *x) { x[0] = undefined_name; }\n'
    )
    with pytest.raises(CudaError, match="(?s)could not compile step.cu.*undefined_name"):
        step_device.compile_step(90, "ptx", kernels_copy)


def test_unknown_target_is_refused():
    with pytest.raises(ValueError, match="target must be 'ptx' or 'cubin', got 'fatbin'"):
        cuda_nvrtc.nvrtc_options(90, "fatbin", ".")


def test_gpus_newer_than_nvrtc_get_ptx_of_the_newest_known_arch(monkeypatch):
    supported = list(check(nvrtc.nvrtcGetSupportedArchs()))
    assert cuda_nvrtc.load_target(supported[-1]) == ("cubin", supported[-1])
    assert cuda_nvrtc.load_target(supported[-1] + 1) == ("ptx", supported[-1])
    with pytest.raises(CudaError, match=f"cannot compile for sm_{supported[0] - 1}"):
        cuda_nvrtc.load_target(supported[0] - 1)
