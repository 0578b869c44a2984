"""ddengine: fast, deterministic DDPM/DDIM sampling of diffusion U-Nets (ONNX Runtime, OpenVINO, TensorRT).

The package root holds `__version__` and the public API, imported lazily: `Sampler` and `SamplingParams`.
The layers below it and which may import which: docs/architecture.md.
"""

__version__ = "0.1.0"

__all__ = ["__version__", "Sampler", "SamplingParams"]


def __getattr__(name):
    # The public API is imported lazily so `import ddengine` stays cheap.
    if name == "Sampler":
        from ddengine.runtime.sampler import Sampler

        return Sampler
    if name == "SamplingParams":
        from ddengine.runtime.params import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'ddengine' has no attribute {name!r}")
