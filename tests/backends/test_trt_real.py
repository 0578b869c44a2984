"""Real TensorRT on a real GPU (skipped without both): build the tiny fp16 model, run it against ONNX Runtime
CPU, and sample with the device loop with and without CUDA graphs."""

import numpy as np
import pytest

from tests.support.conditioning import denoise
from tests.support.gpu import GPU_MARKS, TRT_MARKS

pytestmark = [*GPU_MARKS, *TRT_MARKS]


@pytest.fixture
def built(cond16, tmp_path):
    from ddengine.export.trt_build import BuildConfig, build_engine

    return build_engine(
        BuildConfig(
            onnx_path=cond16,
            engine_path=tmp_path / "cond.plan",
            batch=(1, 2, 4),
            workspace_gb=1,
            timing_cache=tmp_path / "timing.cache",
        )
    )


def test_build_then_reuse(built, cond16, tmp_path):
    from ddengine.export.trt_build import BuildConfig, build_engine

    again = build_engine(BuildConfig(onnx_path=cond16, engine_path=built.engine_path, batch=(1, 2, 4), workspace_gb=1))
    assert again.reused and (tmp_path / "timing.cache").stat().st_size > 0
    assert built.manifest["key"]["profile"]["engine_batch"] == [1, 4, 8]


def test_forward_matches_onnx_runtime(built, cond16):
    from ddengine.backends.ort import OrtBackend
    from ddengine.backends.trt import create
    from ddengine.model.load import load_model

    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 3, 8, 8)).astype(np.float32)
    feeds = {"sample": x, "timestep": np.array([501, 501, 3, 999]), "class_labels": np.array([4, 4, 0, 3])}
    expected = OrtBackend(load_model(cond16)).run(feeds, np.empty_like(x))
    with create(load_model(cond16), engine=built.engine_path) as backend:
        got = backend.run(feeds, np.empty_like(x))
    np.testing.assert_allclose(got, expected, rtol=0, atol=2e-3)  # the fp16 gain is the same in both graphs


def test_device_loop_graph_equals_no_graph(built, cond16):
    from ddengine.backends.trt import create
    from ddengine.core.plan import make_plan
    from ddengine.model.load import load_model
    from ddengine.runtime.device_loop import DeviceLoop

    backend = create(load_model(cond16), engine=built.engine_path)
    plan = make_plan(dict(backend.spec.scheduler), 5, method="ddim", eta=0.5)
    seeds, classes = np.array([5, 6], dtype=np.uint64), np.array([1, 2])
    eager, _ = denoise(DeviceLoop(backend, graphs=False), plan, seeds, classes, 2.0)
    graphed, bad = denoise(DeviceLoop(backend, graphs=True), plan, seeds, classes, 2.0)
    np.testing.assert_array_equal(graphed, eager)
    assert np.isfinite(eager).all() and bad.tolist() == [-1, -1]
