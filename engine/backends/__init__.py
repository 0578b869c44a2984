"""Layer `backends`: what runs the U-Net forward, one module each behind one contract, imported only when chosen.

`--backend auto` resolves, on this machine, to the fastest backend that is installed: a GPU provider when there
is one, else OpenVINO in bf16 where the CPU runs bf16 natively, else ONNX Runtime fp32 (measured faster than
OpenVINO fp32 on the shipped model at every batch; bench/results). `tensorrt` loads the engine `ddengine build`
recorded for the model (engine/backends/trt.py find_engine); `tensorrt:ENGINE.plan` names one.

May import `nets`, `model`, `gpu`, `core` and `files`.
"""

import importlib
import importlib.util
from dataclasses import dataclass

from ddengine.backends.base import Backend, BackendError

__all__ = [
    "Backend",
    "BackendError",
    "BACKENDS",
    "CPU_BACKENDS",
    "AutoChoice",
    "auto_choice",
    "available_backends",
    "resolve_backend",
    "create_backend",
]


@dataclass(frozen=True)
class Entry:
    """A backend: where its factory is, what it needs installed, the precisions it runs, and its device."""

    module: str
    factory: str
    needs: str  # an ONNX Runtime provider, a Python package, or "torch+gpu"
    precisions: tuple  # the first is what "auto" means for it
    device: str = "cpu"
    takes: tuple = ()  # what the factory takes besides (model, name=): "provider" (= needs), "threads", "precision",
    # "engine" (NAME:ENGINE names the engine file it loads)


BACKENDS = {
    "ort-cpu": Entry(
        "ddengine.backends.ort", "OrtBackend", "CPUExecutionProvider", ("fp32",), takes=("provider", "threads")
    ),
    "openvino": Entry(
        "ddengine.backends.openvino",
        "OpenVinoBackend",
        "openvino",
        ("auto", "bf16", "fp32"),
        takes=("threads", "precision"),
    ),
    "ort-cuda": Entry(
        "ddengine.backends.ort_cuda", "OrtCudaBackend", "CUDAExecutionProvider", ("fp32",), "gpu", takes=("threads",)
    ),
    "ort-tensorrt": Entry(
        "ddengine.backends.ort",
        "OrtBackend",
        "TensorrtExecutionProvider",
        ("fp32",),
        "gpu",
        takes=("provider", "threads"),
    ),
    "tensorrt": Entry(
        "ddengine.backends.trt", "create", "tensorrt", ("fp16", "fp32"), "gpu", takes=("engine",)
    ),  # an engine from `ddengine build`
    "torch-cuda": Entry(
        "ddengine.backends.torch_cuda", "TorchCudaBackend", "torch+gpu", ("fp16", "bf16"), "gpu", takes=("precision",)
    ),  # needs the model's torch twin
}
CPU_BACKENDS = tuple(name for name, entry in BACKENDS.items() if entry.device == "cpu")
INSTALL_HINT = {
    "CUDAExecutionProvider": "pip install 'ddengine[gpu]'",
    "TensorrtExecutionProvider": "pip install 'ddengine[gpu]'",
    "tensorrt": "pip install 'ddengine[gpu]'",
    "openvino": "pip install openvino",
    "torch+gpu": "PyTorch with CUDA, cuda-python and an NVIDIA GPU",
}


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

    return [name for name, entry in BACKENDS.items() if have(entry.needs)]


def auto_choice():
    """The fastest backend installed here, and why (`ddengine info` prints it)."""
    available = available_backends()
    if "ort-cuda" in available:
        return AutoChoice(
            "ort-cuda",
            "fp32",
            "ONNX Runtime's CUDA provider is installed (TensorRT and torch-cuda are "
            "chosen explicitly: they need a built engine or the model's torch twin)",
        )
    if "openvino" in available:
        from ddengine.backends.openvino import native_bf16

        if native_bf16():
            return AutoChoice(
                "openvino",
                "bf16",
                "this CPU runs bf16 natively (OpenVINO lists BF16: AMX or AVX512-BF16); "
                "OpenVINO bf16 is the fastest CPU path measured (bench/results)",
            )
        return AutoChoice(
            "ort-cpu",
            "fp32",
            "this CPU has no native bf16; ONNX Runtime fp32 was measured faster than "
            "OpenVINO fp32 on the shipped model",
        )
    return AutoChoice("ort-cpu", "fp32", "OpenVINO is not installed: ONNX Runtime on the CPU, exact fp32")


def resolve_backend(name, precision="auto"):
    """(backend name, precision) for a requested pair; "auto" picks per machine; unknown or unavailable names are refused."""
    if not isinstance(name, str):
        raise BackendError(f"backend must be a name, one of {', '.join(['auto', *BACKENDS])}; got {name!r}")
    name, _ = split_engine(name)
    if name == "auto":
        choice = auto_choice()
        name, precision = choice.name, choice.precision if precision == "auto" else precision
    if name not in BACKENDS:
        raise BackendError(f"unknown backend {name!r}; expected one of {', '.join(['auto', *BACKENDS])}")
    entry = BACKENDS[name]
    if precision != "auto" and precision not in entry.precisions:
        raise BackendError(
            f"backend {name!r} runs precision {', '.join(p for p in entry.precisions if p != 'auto')}; "
            f"got precision {precision!r}"
        )
    available = available_backends()
    if name not in available:
        raise BackendError(
            f"backend {name!r} is not available here (it needs {entry.needs}: "
            f"{INSTALL_HINT.get(entry.needs, 'pip install ' + entry.needs)}); available: {', '.join(available)}"
        )
    return name, precision


def split_engine(name):
    """'tensorrt:ENGINE.plan' -> ('tensorrt', 'ENGINE.plan') for a backend that loads a built engine; else (name, None)."""
    base, sep, engine = name.partition(":")
    if sep and engine and base in BACKENDS and "engine" in BACKENDS[base].takes:
        return base, engine
    return name, None


def create_backend(name, model, *, threads=None, precision="auto"):
    """Load `model` (a ddengine.model.load.Model) on backend `name` ("auto", a key of BACKENDS, or NAME:ENGINE for
    one that loads a built engine) at `precision`."""
    engine = split_engine(name)[1] if isinstance(name, str) else None
    name, precision = resolve_backend(name, precision)
    entry = BACKENDS[name]
    given = {
        "provider": entry.needs,
        "threads": threads,
        "precision": entry.precisions[0] if precision == "auto" else precision,
        "engine": engine,
    }
    factory = getattr(importlib.import_module(entry.module), entry.factory)
    return factory(model, name=name, **{option: given[option] for option in entry.takes})
