"""ONNX Runtime's CUDA provider bound to device buffers, driven by the device loop (skipped without a GPU and
onnxruntime-gpu): same result as the CPU loop; CUDA graphs are refused because Run() cannot be captured."""

import numpy as np
import pytest

from tests.support.conditioning import denoise
from tests.support.gpu import needs_gpu
from tests.support.tiny_models import build_tiny_model


@pytest.mark.filterwarnings("ignore:Specified provider 'CUDAExecutionProvider' is not in available provider names")
def test_silent_cpu_fallback_is_refused(tmp_path):
    """ORT falls back to the CPU when the CUDA provider cannot load; this backend must fail instead."""
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("the CUDA provider is available here, so there is no fallback to provoke")
    from ddengine.backends.base import BackendError
    from ddengine.backends.ort_cuda import OrtCudaBackend
    from ddengine.model.load import load_model

    build_tiny_model(tmp_path / "m.onnx", conv=False)
    with pytest.raises(
        BackendError, match=r"did not enable CUDAExecutionProvider \(active providers: \['CPUExecutionProvider'\]\)"
    ):
        OrtCudaBackend(load_model(tmp_path / "m.onnx"))


@pytest.fixture
def cuda_backend(tmp_path):
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("needs onnxruntime-gpu (CUDAExecutionProvider): pip install ddengine[gpu]")
    from ddengine.backends.ort_cuda import OrtCudaBackend
    from ddengine.model.load import load_model

    path = tmp_path / "uncond.onnx"
    build_tiny_model(path, conv=False)
    return OrtCudaBackend(load_model(path)), path


@needs_gpu
def test_device_loop_matches_the_host_loop(cuda_backend):
    cuda_backend, path = cuda_backend
    from ddengine.backends.ort import OrtBackend
    from ddengine.core.plan import make_plan
    from ddengine.model.load import load_model
    from ddengine.runtime.device_loop import DeviceLoop
    from ddengine.runtime.loop import HostLoop

    plan = make_plan(dict(cuda_backend.spec.scheduler), 5, method="ddpm")
    seeds = np.array([1, 2, 3], dtype=np.uint64)
    got, bad = denoise(DeviceLoop(cuda_backend, graphs=None), plan, seeds, None, None)
    cpu = OrtBackend(load_model(path))
    want, _ = denoise(HostLoop(cpu, cpu.spec), plan, seeds, None, None)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    assert bad.tolist() == [-1, -1, -1]


@needs_gpu
def test_graphs_are_refused(cuda_backend):
    cuda_backend, _ = cuda_backend
    from ddengine.core.plan import make_plan
    from ddengine.runtime.device_loop import DeviceLoop

    plan = make_plan(dict(cuda_backend.spec.scheduler), 2, method="ddpm")
    with pytest.raises(ValueError, match="OrtCudaRunner backend cannot be captured"):
        denoise(DeviceLoop(cuda_backend, graphs=True), plan, np.array([1], np.uint64), None, None)
