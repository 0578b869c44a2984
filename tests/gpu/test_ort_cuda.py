"""ONNX Runtime's CUDA provider bound to device buffers, driven by the device loop (skipped without a GPU and
onnxruntime-gpu): same result as the CPU loop; CUDA graphs are refused because Run() cannot be captured."""
import numpy as np
import pytest
from conftest import needs_gpu

pytestmark = needs_gpu


@pytest.fixture
def cuda_backend(tmp_path):
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        pytest.skip("needs onnxruntime-gpu (CUDAExecutionProvider): pip install ddengine[gpu]")
    from tiny_models import build_tiny_model

    from ddengine.backends.ort_cuda import OrtCudaBackend
    from ddengine.model import load_model

    path = tmp_path / "uncond.onnx"
    build_tiny_model(path, conv=False)
    return OrtCudaBackend(load_model(path))


def test_device_loop_matches_the_cpu_loop(cuda_backend):
    from test_gpu_loop import cpu_loop

    from ddengine.gpu_sampler import GpuLoop
    from ddengine.plan import make_plan

    plan = make_plan(dict(cuda_backend.spec.scheduler), 5, method="ddpm")
    seeds = np.array([1, 2, 3], dtype=np.uint64)
    got = GpuLoop(cuda_backend, plan, graphs=None).denoise(seeds)
    np.testing.assert_allclose(got, cpu_loop(cuda_backend.spec, plan, seeds, None, None), rtol=0, atol=1e-4)


def test_graphs_are_refused(cuda_backend):
    from ddengine.gpu_sampler import GpuLoop
    from ddengine.plan import make_plan

    plan = make_plan(dict(cuda_backend.spec.scheduler), 2, method="ddpm")
    with pytest.raises(ValueError, match="OrtCudaRunner backend cannot be captured"):
        GpuLoop(cuda_backend, plan, graphs=True).denoise(np.array([1], np.uint64))
