"""Fixtures of the CLI tests: the TensorRT stand-ins for `ddengine build` (tests/support/trt_fixtures.py)."""
from tests.support.trt_fixtures import fake_trt, no_trt, onnx16, onnx32  # noqa: F401
