"""Backends that run the U-Net forward: one module each, imported only when chosen."""
import importlib
import importlib.util

from ddengine.backends.base import Backend, BackendError

# backend name -> (module, factory, what it needs: an ONNX Runtime provider or a Python package)
BACKENDS = {
    "ort-cpu": ("ddengine.backends.ort", "OrtBackend", "CPUExecutionProvider"),
    "ort-cuda": ("ddengine.backends.ort_cuda", "OrtCudaBackend", "CUDAExecutionProvider"),
    "ort-tensorrt": ("ddengine.backends.ort", "OrtBackend", "TensorrtExecutionProvider"),
    "tensorrt": ("ddengine.backends.trt", "create", "tensorrt"),  # needs an engine built by `ddengine build`
}
AUTO_ORDER = ("ort-cuda", "ort-cpu")  # engines that build on first use (TensorRT) are chosen explicitly only

__all__ = ["Backend", "BackendError", "BACKENDS", "available_backends", "resolve_backend", "create_backend"]


def available_backends():
    """Names of the backends whose runtime is installed here."""
    import onnxruntime

    providers = set(onnxruntime.get_available_providers())

    def have(need):
        return need in providers if need.endswith("ExecutionProvider") else importlib.util.find_spec(need) is not None
    return [name for name, (_, _, need) in BACKENDS.items() if have(need)]


def resolve_backend(name):
    """Map "auto" to the best available backend; reject unknown or unavailable names."""
    available = available_backends()
    if name == "auto":
        return next(n for n in AUTO_ORDER if n in available)
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; expected one of {', '.join(['auto', *BACKENDS])}")
    if name not in available:
        need = BACKENDS[name][2]
        raise BackendError(f"backend {name!r} is not available here (it needs {need}, from pip install 'ddengine[gpu]'); "
                           f"available: {', '.join(available)}")
    return name


def create_backend(name, model, *, threads=None):
    """Load `model` (a ddengine.model.Model) on backend `name` ("auto" or a key of BACKENDS)."""
    name = resolve_backend(name)
    module, factory, need = BACKENDS[name]
    provider = need if need.endswith("ExecutionProvider") else None
    return getattr(importlib.import_module(module), factory)(model, provider=provider, threads=threads, name=name)
