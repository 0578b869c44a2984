"""ddengine: fast, deterministic DDPM/DDIM sampling of diffusion U-Nets (ONNX Runtime, TensorRT)."""

__version__ = "0.1.0"

__all__ = ["__version__", "Sampler"]


def __getattr__(name):
    # The public API is imported lazily so `import ddengine` stays cheap.
    if name == "Sampler":
        from ddengine.sampler import Sampler

        return Sampler
    raise AttributeError(f"module 'ddengine' has no attribute {name!r}")
