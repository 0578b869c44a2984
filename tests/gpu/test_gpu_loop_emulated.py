"""The GPU loop's orchestration on a CPU stand-in for CUDA (cuda_emulator.py), so it runs in CI without a GPU:
launch arguments match step.cu's signatures, graph replay equals eager launches, the result equals the CPU
Sampler loop bit for bit (the emulator runs the C kernels), and the TensorRT runner/host path moves data right.
What it cannot show: that real CUDA accepts these calls (tests/gpu/test_gpu_loop.py does, on a GPU)."""
import sys

import numpy as np
import pytest
import fake_tensorrt
from cuda_emulator import Emulator
from tiny_models import SCHEDULER
from toy_cuda_model import cpu_loop, forward32

import ddengine.cuda_step as cuda_step
import ddengine.gpu_sampler as gpu_sampler
from ddengine.backends.base import BackendError
from ddengine.plan import make_plan


@pytest.fixture
def emu(monkeypatch):
    em = Emulator()
    for module in (cuda_step, gpu_sampler):
        monkeypatch.setattr(module, "import_cuda", lambda: (em.driver, em.runtime, em.nvrtc))
    monkeypatch.setattr(cuda_step, "compiled_step", lambda arch, target="cubin", folder=None: b"emulated image")
    monkeypatch.setattr(cuda_step, "_kernels", {})
    return em


def toy_forward(emu, spec, batch, sample, timestep, labels, out):
    """The toy model reading and writing emulated device memory (what an engine's enqueue would do)."""
    shape = (batch, spec.channels, spec.height, spec.width)
    per = int(np.prod(shape))
    x = emu.view(sample, np.float32, per).reshape(shape)
    t = emu.view(timestep, np.int64, batch).reshape(-1, 1, 1, 1)
    cls = emu.view(labels, np.int64, batch) if labels else None
    emu.view(out, np.float32, per)[:] = forward32(x, t, cls, spec).ravel()


class EmuRunner:
    supports_capture = True

    def __init__(self, emu, spec, stream):
        self.emu, self.spec, self.stream = emu, spec, stream

    def dtype(self, role):
        return np.dtype(np.float32 if role in ("sample", "out") else np.int64)

    def shape(self, role, batch):
        s = self.spec
        return (batch, s.channels, s.height, s.width) if role in ("sample", "out") else (batch,)

    def bind(self, batch, *, sample, timestep, class_labels, out):
        self.args = (batch, int(sample), int(timestep), int(class_labels) if class_labels is not None else 0, int(out))

    def enqueue(self):
        self.emu.submit(self.stream, lambda args=self.args: toy_forward(self.emu, self.spec, *args))

    def close(self):
        pass


class EmuBackend:
    def __init__(self, emu, spec):
        self.emu, self.spec = emu, spec

    def open_runner(self, stream):
        return EmuRunner(self.emu, self.spec, stream)


def plan(steps=5, method="ddim", eta=1.0):
    return make_plan(dict(SCHEDULER), steps, method=method, eta=eta)


def spec(num_classes=0, channels=1):
    from tiny_models import tiny_spec

    return tiny_spec(channels=channels, num_classes=num_classes)


@pytest.mark.parametrize("graphs", [False, True])
@pytest.mark.parametrize("method, eta", [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 1.0)])
def test_loop_equals_the_cpu_loop(emu, graphs, method, eta):
    s, p, seeds = spec(), plan(6, method, eta), np.array([3, 1, 4], dtype=np.uint64)
    got = gpu_sampler.GpuLoop(EmuBackend(emu, s), p, graphs=graphs).denoise(seeds)
    np.testing.assert_array_equal(got, cpu_loop(s, p, seeds, None, None))
    per_step = ["ddstep_set_timesteps_i64", "ddstep_step", "ddstep_advance"]
    assert emu.launches == ["ddstep_fill_noise"] + per_step * 6


def test_guided_conditional_loop_equals_the_cpu_loop(emu):
    s, p = spec(num_classes=4, channels=3), plan(4)
    seeds, labels = np.array([10, 20], dtype=np.uint64), np.array([4, 4, 1, 2], dtype=np.int64)
    loop = gpu_sampler.GpuLoop(EmuBackend(emu, s), p, guidance=3.0, graphs=True)
    np.testing.assert_array_equal(loop.denoise(seeds, labels), cpu_loop(s, p, seeds, labels, 3.0))


def test_graph_is_captured_once_per_batch_size_and_replayed(emu):
    loop = gpu_sampler.GpuLoop(EmuBackend(emu, spec()), plan(5), graphs=True)
    seeds = np.array([7, 8, 9, 10], dtype=np.uint64)
    first = loop.denoise(seeds)
    np.testing.assert_array_equal(loop.denoise(seeds), first)  # replay restarts at step 0 with fresh noise
    np.testing.assert_array_equal(loop.denoise(seeds[1:3]), first[1:3])  # image i is batch-independent
    assert sorted(loop._states) == [2, 4] and all(st.graph_exec is not None for st in loop._states.values())
    assert len(emu.graphs) == 0  # graphs are destroyed once instantiated; only the executables remain


def test_labels_must_match_the_model_batch(emu):
    loop = gpu_sampler.GpuLoop(EmuBackend(emu, spec(num_classes=4, channels=3)), plan(2), guidance=2.0)
    with pytest.raises(ValueError, match="labels must hold 4 class ids for 2 images, got 2"):
        loop.denoise(np.array([1, 2], np.uint64), np.array([0, 1]))


def test_guidance_on_an_unconditional_model_is_refused(emu):
    loop = gpu_sampler.GpuLoop(EmuBackend(emu, spec()), plan(2), guidance=2.0)
    with pytest.raises(ValueError, match="guidance needs a class-conditional model"):
        loop.denoise(np.array([1], np.uint64))


# --- the TensorRT backend (fake tensorrt whose execute_async_v3 runs the toy model on emulated memory) --------

COND_IO = {"sample": (fake_tensorrt.TensorIOMode.INPUT, fake_tensorrt.DataType.FLOAT, (-1, 3, 8, 8)),
           "timestep": (fake_tensorrt.TensorIOMode.INPUT, fake_tensorrt.DataType.INT64, (-1,)),
           "class_labels": (fake_tensorrt.TensorIOMode.INPUT, fake_tensorrt.DataType.INT64, (-1,)),
           "out": (fake_tensorrt.TensorIOMode.OUTPUT, fake_tensorrt.DataType.FLOAT, (-1, 3, 8, 8))}


@pytest.fixture
def trt_engine(fake_trt, emu, cond16, tmp_path, monkeypatch):
    from ddengine.backends.trt import TensorRTBackend
    from ddengine.export.trt_build import BuildConfig, build_engine

    module = fake_tensorrt.make_module(io=COND_IO)
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    path = build_engine(BuildConfig(onnx_path=cond16, engine_path=tmp_path / "c.plan", batch=(1, 2, 4))).engine_path
    backend = TensorRTBackend(path)

    def execute(context, stream):
        batch = context.shapes["sample"][0]
        assert context.shapes == {"sample": (batch, 3, 8, 8), "timestep": (batch,), "class_labels": (batch,)}
        a = context.addresses
        emu.submit(stream, lambda: toy_forward(emu, backend.spec, batch, a["sample"], a["timestep"], a["class_labels"], a["out"]))

    module.state.on_execute = execute
    return backend


def test_tensorrt_host_run_moves_inputs_and_outputs(trt_engine):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 3, 8, 8)).astype(np.float32)
    labels = np.array([0, 4, 2], dtype=np.int64)
    out = trt_engine.run(x, 501, labels, np.empty_like(x))
    np.testing.assert_array_equal(out, forward32(x, np.full((3, 1, 1, 1), 501), labels, trt_engine.spec))


def test_tensorrt_host_run_needs_labels_for_a_conditional_engine(trt_engine):
    x = np.zeros((2, 3, 8, 8), np.float32)
    with pytest.raises(BackendError, match="needs 2 class labels, got None"):
        trt_engine.run(x, 1, None, np.empty_like(x))


def test_tensorrt_device_loop_with_graphs_equals_the_cpu_loop(trt_engine):
    p = plan(4)
    seeds, labels = np.array([5, 6], dtype=np.uint64), np.array([4, 4, 1, 2], dtype=np.int64)
    loop = gpu_sampler.GpuLoop(trt_engine, p, guidance=2.0, graphs=True)
    np.testing.assert_array_equal(loop.denoise(seeds, labels), cpu_loop(trt_engine.spec, p, seeds, labels, 2.0))
    with pytest.raises(BackendError, match=r"batch 10 is outside the engine's profile \[1, 8\]"):
        loop.denoise(np.arange(5, dtype=np.uint64) + 1, np.zeros(10, np.int64))


def test_concurrent_callers_get_their_own_execution_context(trt_engine):
    """A second `run` while the first is inside execute_async_v3 must not share its context (TensorRT#1300)."""
    module = sys.modules["tensorrt"]
    forward = module.state.on_execute
    contexts = []

    def execute(context, stream):
        contexts.append(context)
        if len(contexts) == 1:  # a second caller arrives mid-forward
            x2 = np.ones((1, 3, 8, 8), np.float32)
            trt_engine.run(x2, 3, np.array([1]), np.empty_like(x2))
        forward(context, stream)

    module.state.on_execute = execute
    x = np.zeros((2, 3, 8, 8), np.float32)
    trt_engine.run(x, 1, np.array([0, 1]), np.empty_like(x))
    assert len(contexts) == 2 and contexts[0] is not contexts[1]
    trt_engine.run(x, 1, np.array([0, 1]), np.empty_like(x))  # afterwards both sessions are idle and reused
    assert contexts[2] in contexts[:2]


def test_gpu_sampling_reuses_loops_per_plan_and_thread_and_flags_nonfinite_images(emu):
    import threading

    s = spec()
    sampling = gpu_sampler.GpuSampling(EmuBackend(emu, s))
    assert gpu_sampler.uses_gpu_loop(sampling.backend) and not gpu_sampler.uses_gpu_loop(object())
    p, seeds = plan(3), np.array([1, 2], dtype=np.uint64)
    x, bad = sampling.denoise(p, seeds, None, None)
    np.testing.assert_array_equal(x, cpu_loop(s, p, seeds, None, None))
    assert bad.tolist() == [-1, -1]
    sampling.denoise(make_plan(dict(SCHEDULER), 3, method="ddim", eta=1.0), seeds, None, None)  # equal plan: reused
    sampling.denoise(plan(4), seeds, None, None)
    worker = threading.Thread(target=sampling.denoise, args=(p, seeds, None, None))
    worker.start()
    worker.join()
    assert len(sampling._all) == 3  # plans of 3 and 4 steps here, one more loop for the other thread
    loop = sampling._local.loops[(p.timesteps.tobytes(), p.coeffs.tobytes(), p.clip, None)]
    real_download = loop._states[2].x.download

    def poisoned(stream=None, shape=None):
        out = real_download(stream, shape)
        out[1, 0, 0, 0] = np.nan
        return out

    loop._states[2].x.download = poisoned
    assert sampling.denoise(p, seeds, None, None)[1].tolist() == [-1, 2]
    sampling.close()
    assert sampling._all == []
