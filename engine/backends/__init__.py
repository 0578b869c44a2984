"""Backends that run the U-Net forward: one module each, imported only when chosen."""
import importlib
import importlib.util
from dataclasses import dataclass

from ddengine.backends.base import Backend, BackendError

# backend name -> (module, factory, what it needs: an ONNX Runtime provider or a Python package)
BACKENDS = {
    "ort-cpu": ("ddengine.backends.ort", "OrtBackend", "CPUExecutionProvider"),
    "ort-cuda": ("ddengine.backends.ort_cuda", "OrtCudaBackend", "CUDAExecutionProvider"),
    "ort-tensorrt": ("ddengine.backends.ort", "OrtBackend", "TensorrtExecutionProvider"),
    "tensorrt": ("ddengine.backends.trt", "create", "tensorrt"),  # needs an engine built by `ddengine build`
    "torch-cuda": ("ddengine.backends.torch_cuda", "TorchCudaBackend", "torch+gpu"),  # needs the model's torch twin
}
CPU_BACKENDS = ("ort-cpu",)
INSTALL_HINT = {"CUDAExecutionProvider": "pip install 'ddengine[gpu]'", "TensorrtExecutionProvider": "pip install 'ddengine[gpu]'",
                "tensorrt": "pip install 'ddengine[gpu]'", "torch+gpu": "PyTorch with CUDA, cuda-python and an NVIDIA GPU"}

__all__ = ["Backend", "BackendError", "BACKENDS", "CPU_BACKENDS", "AutoChoice", "auto_choice", "available_backends", "resolve_backend",
           "create_backend"]


@dataclass(frozen=True)
class AutoChoice:
    """What `--backend auto` resolves to on this machine, and why."""

    name: str
    precision: str
    reason: str


def available_backends():
    """Names of the backends whose runtime is installed here."""
    import onnxruntime

    providers = set(onnxruntime.get_available_providers())

    def have(need):
        if need.endswith("ExecutionProvider"):
            return need in providers
        if need == "torch+gpu":  # torch is not imported for this: a GPU that cuda-python sees, and torch installed
            from ddengine.gpu.driver import device_count

            return importlib.util.find_spec("torch") is not None and device_count() > 0
        return importlib.util.find_spec(need) is not None
    return [name for name, (_, _, need) in BACKENDS.items() if have(need)]


def auto_choice():
    """The fastest backend installed here: a GPU through ONNX Runtime's CUDA provider, else ONNX Runtime on the CPU."""
    available = available_backends()
    if "ort-cuda" in available:
        return AutoChoice("ort-cuda", "fp32", "ONNX Runtime's CUDA provider is installed (TensorRT engines are chosen explicitly)")
    return AutoChoice("ort-cpu", "fp32", "no GPU provider is installed: ONNX Runtime on the CPU, exact fp32")


def resolve_backend(name):
    """Map "auto" to the best available backend; reject unknown or unavailable names."""
    if name == "auto":
        return auto_choice().name
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; expected one of {', '.join(['auto', *BACKENDS])}")
    available = available_backends()
    if name not in available:
        need = BACKENDS[name][2]
        raise BackendError(f"backend {name!r} is not available here (it needs {need}: {INSTALL_HINT.get(need, 'pip install ' + need)}); "
                           f"available: {', '.join(available)}")
    return name


def create_backend(name, model, *, threads=None):
    """Load `model` (a ddengine.model.Model) on backend `name` ("auto" or a key of BACKENDS)."""
    if not isinstance(name, str):
        raise BackendError(f"backend must be a name, one of {', '.join(['auto', *BACKENDS])}; got {name!r}")
    name = resolve_backend(name)
    module, factory, need = BACKENDS[name]
    provider = need if need.endswith("ExecutionProvider") else None
    return getattr(importlib.import_module(module), factory)(model, provider=provider, threads=threads, name=name)
