"""The parts of a text-to-image pipeline around the U-Net (text encoder, VAE decoder): one ONNX function each,
on ONNX Runtime (exact fp32) or OpenVINO (bf16 where native), called with named numpy inputs.

Parts run on the CPU: a GPU backend (or `auto` on a GPU machine) puts them on this CPU's best backend, the one
`auto` picks without a GPU (`ddengine info MODEL_DIR` prints where each part runs).
"""

import numpy as np

from ddengine.backends import BACKENDS, BackendError, available_backends, resolve_backend

PART_BACKENDS = ("ort-cpu", "openvino")


def part_backend(backend="auto", precision="auto"):
    """(backend, precision) a part runs on: a CPU backend as asked; auto or a GPU backend -> the CPU's best."""
    name, precision = resolve_backend(backend, precision)
    if BACKENDS[name].device == "cpu":
        if name not in PART_BACKENDS:
            raise BackendError(f"pipeline parts run on {', '.join(map(repr, PART_BACKENDS))}; got backend {name!r}")
        return name, precision
    if "openvino" in available_backends():
        from ddengine.backends.openvino import native_bf16

        if native_bf16():
            return "openvino", "bf16"
    return "ort-cpu", "fp32"


class OnnxPart:
    """`part(**inputs) -> first output` of one ONNX file on a CPU backend ("ort-cpu" or "openvino")."""

    def __init__(self, path, backend="auto", precision="auto", threads=None):
        name, precision = part_backend(backend, precision)
        self.path, self.name = path, name
        if name == "openvino":
            from ddengine.backends.openvino import OpenVinoGraph

            self.graph = OpenVinoGraph(path, precision, threads)
            self.precision = self.graph.precision
        else:
            import onnxruntime as ort

            from ddengine.backends.ort import session_options

            try:
                self.graph = ort.InferenceSession(
                    str(path), session_options(threads), providers=["CPUExecutionProvider"]
                )
            except Exception as err:  # ORT's own exception types
                raise BackendError(f"ONNX Runtime could not load {path}: {err}") from None
            self.precision = "fp32"

    def __call__(self, **inputs):
        if self.name == "openvino":
            return self.graph.infer(inputs)
        try:
            return self.graph.run(None, {k: np.ascontiguousarray(v) for k, v in inputs.items()})[0]
        except Exception as err:
            raise BackendError(f"ONNX Runtime: the forward of {self.path} failed: {err}") from None
