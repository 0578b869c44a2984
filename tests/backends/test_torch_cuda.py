"""The torch-CUDA backend (engine/backends/torch_cuda.py): its model loading on the CPU, and on a GPU the forward
against ONNX Runtime, the device loop's CUDA graph against eager launches, and against the host loop."""

import numpy as np
import pytest

from tests.support.conditioning import denoise
from tests.support.gpu import HAS_GPU, needs_gpu

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def shipped():
    from ddengine.model.load import load_model

    return load_model()


def test_the_shipped_model_has_a_torch_twin_computing_the_same_function(shipped):
    from ddengine.backends.ort import OrtBackend
    from ddengine.nets.twin import load_twin, twin_path

    net = load_twin(twin_path(shipped.path))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 1, 32, 32)).astype(np.float32)
    t, labels = np.array([999, 500, 1]), np.array([0, 10, 7])
    onnx_out = OrtBackend(shipped).run({"sample": x, "timestep": t, "class_labels": labels}, np.empty_like(x))
    with torch.inference_mode():
        fp32 = net(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(labels)).numpy()
        bf16 = (
            net.to(torch.bfloat16)(torch.from_numpy(x).bfloat16(), torch.from_numpy(t), torch.from_numpy(labels))
            .float()
            .numpy()
        )
    assert np.abs(fp32 - onnx_out).max() < 1e-4
    assert np.abs(bf16 - onnx_out).max() < 0.1 * np.abs(onnx_out).max()  # half precision runs (dtype follows the input)


@pytest.mark.skipif(HAS_GPU, reason="a GPU is present: the missing-CUDA error cannot be provoked")
def test_without_cuda_the_backend_is_a_clear_error(shipped):
    from ddengine.backends import BackendError, available_backends
    from ddengine.backends.torch_cuda import TorchCudaBackend

    assert "torch-cuda" not in available_backends()
    with pytest.raises(BackendError, match="needs a CUDA GPU"):
        TorchCudaBackend(shipped)


@needs_gpu
def test_a_model_without_a_twin_is_refused(tmp_path):
    from ddengine.backends import BackendError
    from ddengine.backends.torch_cuda import TorchCudaBackend
    from ddengine.model.load import load_model
    from tests.support.tiny_models import build_tiny_model

    build_tiny_model(tmp_path / "m.onnx")
    with pytest.raises(BackendError, match="torch twin .*m.safetensors does not exist"):
        TorchCudaBackend(load_model(tmp_path / "m.onnx"))


@pytest.fixture(scope="module")
def backend(shipped):
    if not HAS_GPU or not torch.cuda.is_available():
        pytest.skip("needs an NVIDIA GPU with torch CUDA")
    from ddengine.backends.torch_cuda import TorchCudaBackend

    return TorchCudaBackend(shipped, precision="fp16")


@needs_gpu
def test_forward_matches_onnx_runtime_within_fp16(backend, shipped):
    from ddengine.backends.ort import OrtBackend

    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 1, 32, 32)).astype(np.float32)
    feeds = {"sample": x, "timestep": np.array([999, 700, 20, 0]), "class_labels": np.array([0, 3, 10, 9])}
    want = OrtBackend(shipped).run(feeds, np.empty_like(x))
    got = backend.run(feeds, np.empty_like(x))
    assert np.abs(got - want).max() < 2e-2 * max(1.0, np.abs(want).max())


@needs_gpu
@pytest.mark.parametrize("guidance", [None, 1.5])
def test_graphs_equal_eager_and_the_host_loop(backend, shipped, guidance):
    from ddengine.runtime.device_loop import DeviceLoop
    from ddengine.runtime.loop import HostLoop
    from ddengine.runtime.params import SamplingParams
    from ddengine.runtime.parts import step_plan

    request = SamplingParams.build(n=6, steps=20, classes="all", guidance=guidance).bind(shipped.spec, batch_size=6)
    plan, seeds, classes = step_plan(shipped.spec, request), request.seeds, request.classes
    eager, bad = denoise(DeviceLoop(backend, graphs=False), plan, seeds, classes, guidance)
    loop = DeviceLoop(backend, graphs=True)
    graphed, _ = denoise(loop, plan, seeds, classes, guidance)
    again, _ = denoise(loop, plan, seeds, classes, guidance)  # replayed from the cached graph
    assert np.array_equal(graphed, eager) and np.array_equal(again, eager) and bad.tolist() == [-1] * 6
    host, _ = denoise(HostLoop(backend, shipped.spec), plan, seeds, classes, guidance)  # same forward, C step kernel
    assert np.abs(host - eager).max() < 1e-3


@needs_gpu
def test_the_sampler_runs_the_device_loop(shipped):
    from ddengine import Sampler

    with Sampler(backend="torch-cuda") as sampler:
        images, records = sampler.sample(8, steps=10, classes="all", guidance=1.5)
    assert images.shape == (8, 32, 32, 1) and {r["backend"] for r in records} == {"torch-cuda"}
    assert all(r["status"] == "ok" for r in records) and images.std() > 10
