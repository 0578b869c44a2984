"""The parts of a text-to-image pipeline around the U-Net (text encoder, VAE decoder): one ONNX function each,
on ONNX Runtime (exact fp32) or OpenVINO (bf16 where native), called with named numpy inputs."""
import numpy as np

from ddengine.backends import BackendError, resolve_backend


class OnnxPart:
    """`part(**inputs) -> first output` of one ONNX file on a CPU backend ("ort-cpu" or "openvino")."""

    def __init__(self, path, backend="auto", precision="auto", threads=None):
        name, precision = resolve_backend(backend, precision)
        if name not in ("ort-cpu", "openvino"):
            raise BackendError(f"pipeline parts run on 'ort-cpu' or 'openvino'; got backend {name!r}")
        self.path, self.name = path, name
        if name == "openvino":
            from ddengine.backends.openvino import OpenVinoGraph

            self.graph = OpenVinoGraph(path, precision, threads)
            self.precision = self.graph.precision
        else:
            import onnxruntime as ort

            from ddengine.backends.ort import session_options

            try:
                self.graph = ort.InferenceSession(str(path), session_options(threads), providers=["CPUExecutionProvider"])
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
