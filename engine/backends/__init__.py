"""Backends that run the U-Net forward: one module each, imported only when chosen."""
import importlib

from ddengine.backends.base import Backend, BackendError

# backend name -> (module, factory, ONNX Runtime provider it needs or None)
BACKENDS = {
    "ort-cpu": ("ddengine.backends.ort", "OrtBackend", "CPUExecutionProvider"),
    "ort-cuda": ("ddengine.backends.ort", "OrtBackend", "CUDAExecutionProvider"),
    "ort-tensorrt": ("ddengine.backends.ort", "OrtBackend", "TensorrtExecutionProvider"),
}
AUTO_ORDER = ("ort-tensorrt", "ort-cuda", "ort-cpu")

__all__ = ["Backend", "BackendError", "BACKENDS", "available_backends", "resolve_backend", "create_backend"]


def available_backends():
    """Names of the backends whose runtime is installed, best first."""
    import onnxruntime

    providers = set(onnxruntime.get_available_providers())
    return [name for name in AUTO_ORDER if BACKENDS[name][2] in providers]


def resolve_backend(name):
    """Map "auto" to the best available backend; reject unknown or unavailable names."""
    if name == "auto":
        return available_backends()[0]
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; expected one of {', '.join(['auto', *BACKENDS])}")
    if name not in available_backends():
        raise BackendError(f"backend {name!r} is not available here (needs onnxruntime-gpu); available: {', '.join(available_backends())}")
    return name


def create_backend(name, model, *, threads=None):
    """Load `model` (a ddengine.model.Model) on backend `name` ("auto", "ort-cpu", "ort-cuda", "ort-tensorrt")."""
    name = resolve_backend(name)
    module, factory, provider = BACKENDS[name]
    return getattr(importlib.import_module(module), factory)(model, provider=provider, threads=threads, name=name)
