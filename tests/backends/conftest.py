"""Fixtures of the backend tests (tests/support/trt_fixtures.py)."""
from tests.support.trt_fixtures import cond16, fake_trt, no_trt, onnx16, onnx32  # noqa: F401
