"""The device loop (engine/runtime/device_loop.py) on a CPU stand-in for CUDA (tests/support/cuda_emulator.py), so it runs in
CI without a GPU: every launch runs step.cu itself (compiled for the host), graph replay equals eager launches,
and the result — latents and each image's first non-finite step — equals the host loop (engine/runtime/loop.py) bit for
bit. What it cannot show: that real CUDA accepts these calls (tests/runtime/test_device_loop.py does, on a GPU).
"""

import threading

import numpy as np
import pytest

from ddengine.backends.base import Backend, DeviceRunner
from ddengine.core.plan import make_plan
from ddengine.gpu import driver
from ddengine.kernels import device as step_kernels
from ddengine.runtime import device_loop as device
from ddengine.runtime.loop import HostLoop
from tests.support.conditioning import denoise
from tests.support.cuda_emulator import Emulator
from tests.support.host_cuda import build_host_cuda
from tests.support.tiny_models import SCHEDULER
from tests.support.toy_model import ToyHostBackend, bound_spec, forward32


@pytest.fixture(scope="module")
def host_cuda(tmp_path_factory):
    return build_host_cuda(tmp_path_factory.mktemp("emulated_cuda"))


@pytest.fixture
def emu(monkeypatch, host_cuda):
    em = Emulator(host_cuda)
    monkeypatch.setattr(driver, "import_cuda", lambda: (em.driver, em.runtime, em.nvrtc))
    monkeypatch.setattr(step_kernels, "compiled_step", lambda arch, target="cubin", folder=None: b"emulated image")
    monkeypatch.setattr(step_kernels, "_loaded", {})
    return em


class EmuRunner(DeviceRunner):
    """The toy model as an engine would run it: reads and writes "device" memory on the loop's stream."""

    supports_capture = True

    def _bind_tensor(self, role, name, rows, address):
        self.rows, self.__dict__.setdefault("addresses", {})[role] = rows, address

    def enqueue(self):
        a, rows, spec, emu = dict(self.addresses), self.rows, self.spec, self.backend.emu
        self.backend.forwards += 1

        def forward():
            x = emu.view(a["sample"], np.float32, rows * spec.per_image).reshape(rows, *spec.image_shape)
            t = emu.view(a["timestep"], np.int64, rows)
            labels = emu.view(a["class_labels"], np.int64, rows) if "class_labels" in a else None
            emu.view(a["out"], np.float32, rows * spec.per_image)[:] = forward32(
                x, t, labels, spec, self.backend.nan_class
            ).ravel()

        emu.submit(self.stream, forward)


class EmuBackend(Backend):
    name, opens_device_runners = "emulated", True

    def __init__(self, emu, spec, nan_class=None):
        self.emu, self.spec, self.nan_class, self.forwards = emu, spec, nan_class, 0

    def open_runner(self, stream):
        return EmuRunner(self, stream)


def plan(steps=5, method="ddim", eta=1.0):
    return make_plan(dict(SCHEDULER), steps, method=method, eta=eta)


def host(spec, p, seeds, classes=None, guidance=None, nan_class=None):
    return denoise(HostLoop(ToyHostBackend(spec, nan_class), spec), p, seeds, classes, guidance)


@pytest.mark.parametrize("graphs", [False, True])
@pytest.mark.parametrize("method, eta", [("ddpm", 0.0), ("ddim", 0.0), ("ddim", 1.0)])
def test_device_loop_equals_the_host_loop(emu, graphs, method, eta):
    spec, p, seeds = bound_spec(), plan(6, method, eta), np.array([3, 1, 4], dtype=np.uint64)
    x, bad = denoise(device.DeviceLoop(EmuBackend(emu, spec), graphs=graphs), p, seeds, None, None)
    want_x, want_bad = host(spec, p, seeds)
    assert np.array_equal(x.view(np.uint32), want_x.view(np.uint32)) and bad.tolist() == want_bad.tolist() == [-1] * 3
    per_step = ["ddstep_set_timesteps_i64", "ddstep_step", "ddstep_advance"]
    assert emu.launches == ["ddstep_fill_noise"] + per_step * 6


@pytest.mark.parametrize("guidance", [None, 0.0, 1.0, 3.0])
def test_guided_conditional_loop_equals_the_host_loop(emu, guidance):
    spec, p = bound_spec(num_classes=4, channels=3), plan(4)
    seeds, classes = np.array([10, 20, 30], dtype=np.uint64), np.array([1, 2, 0])
    x, _ = denoise(device.DeviceLoop(EmuBackend(emu, spec), graphs=True), p, seeds, classes, guidance)
    assert np.array_equal(x, host(spec, p, seeds, classes, guidance)[0])


def test_non_finite_images_are_reported_at_the_same_first_step(emu):
    spec, p = bound_spec(num_classes=4, channels=3), plan(4)
    seeds, classes = np.array([1, 2, 3], dtype=np.uint64), np.array([0, 2, 1])
    _, bad = denoise(device.DeviceLoop(EmuBackend(emu, spec, nan_class=2), graphs=True), p, seeds, classes, 2.0)
    assert bad.tolist() == host(spec, p, seeds, classes, 2.0, nan_class=2)[1].tolist() == [-1, 0, -1]


def test_graph_is_captured_once_per_plan_and_batch_and_replayed(emu):
    backend = EmuBackend(emu, bound_spec())
    loop, p = device.DeviceLoop(backend, graphs=True), plan(5)
    seeds = np.array([7, 8, 9, 10], dtype=np.uint64)
    first, _ = denoise(loop, p, seeds, None, None)
    forwards = backend.forwards
    again, _ = denoise(loop, p, seeds, None, None)  # replay restarts at step 0 with fresh noise
    assert backend.forwards == forwards  # every step of the second call was a graph launch
    assert np.array_equal(again, first)
    assert np.array_equal(denoise(loop, p, seeds[1:3], None, None)[0], first[1:3])  # image i is batch-independent
    assert len(loop.states) == 2 and all(st.graph is not None for st in loop.states.values())
    assert len(emu.graphs) == 0  # graphs are destroyed once instantiated; only the executables remain
    loop.close()
    assert emu.memory == {}  # every device buffer freed


def test_the_device_states_are_bounded_and_an_evicted_plan_is_rebuilt_exactly(emu):
    loop, seeds = device.DeviceLoop(EmuBackend(emu, bound_spec()), graphs=True), np.array([3, 4], dtype=np.uint64)
    first, _ = denoise(loop, plan(1), seeds, None, None)
    per_state = len(emu.memory)  # one state's device buffers (the loop itself allocates none)
    for steps in range(2, device.MAX_STATES + 4):
        denoise(loop, plan(steps), seeds, None, None)
    assert len(loop.states) == device.MAX_STATES and len(emu.memory) == device.MAX_STATES * per_state
    again, _ = denoise(loop, plan(1), seeds, None, None)  # evicted long ago: a new state, the same bits
    assert np.array_equal(again, first) and len(loop.states) == device.MAX_STATES
    loop.close()
    assert emu.memory == {}


def test_graphs_required_but_not_capturable_is_refused(emu):
    backend = EmuBackend(emu, bound_spec())

    class Uncapturable(EmuRunner):
        supports_capture = False

    backend.open_runner = lambda stream: Uncapturable(backend, stream)
    with pytest.raises(ValueError, match="cannot be captured"):
        denoise(device.DeviceLoop(backend, graphs=True), plan(2), np.array([1], np.uint64), None, None)


def test_progress_is_reported_after_each_step_has_run(emu):
    steps = []
    denoise(
        device.DeviceLoop(EmuBackend(emu, bound_spec())),
        plan(3),
        np.array([1], np.uint64),
        None,
        None,
        on_step=lambda i, t, x: steps.append((i, t, emu.launches.count("ddstep_step"))),
    )
    assert steps == [(i, int(t), i + 1) for i, t in enumerate(plan(3).timesteps)]  # step i's kernel has run


class Recorder:
    """Snapshots at every other step and the last (the loops' snapshot interface), and x after every step."""

    def __init__(self):
        self.snapshots, self.xs = [], []

    def wants(self, i):
        return i % 2 == 0 or i == 4

    def take(self, i, t, x_t, x0):
        self.snapshots.append((i, t, x_t.copy(), x0.copy()))

    def on_step(self, i, t, x):
        self.xs.append(x.copy())


@pytest.mark.parametrize("method", ["ddim", "dpmpp-2m"])
@pytest.mark.parametrize("graphs", [False, True])
def test_callbacks_and_snapshots_read_the_devices_x_and_x0_as_the_host_loop_does(emu, graphs, method):
    spec, p = bound_spec(num_classes=4, channels=3), plan(5, method=method, eta=0.0)
    seeds, classes = np.array([5, 6, 7], dtype=np.uint64), np.array([1, 0, 3])
    on_device, on_host = Recorder(), Recorder()
    loop = device.DeviceLoop(EmuBackend(emu, spec), graphs=graphs)
    x, _ = denoise(loop, p, seeds, classes, 2.0, on_step=on_device.on_step, snapshots=on_device, host_x=True)
    host_loop = HostLoop(ToyHostBackend(spec), spec)
    want, _ = denoise(host_loop, p, seeds, classes, 2.0, on_step=on_host.on_step, snapshots=on_host)
    assert np.array_equal(x, want) and len(on_device.xs) == 5 and len(on_device.snapshots) == 3  # steps 0, 2, 4
    for got, expected in zip(on_device.xs, on_host.xs):
        assert np.array_equal(got, expected)
    for (i, t, x_t, x0), (j, u, y_t, y0) in zip(on_device.snapshots, on_host.snapshots, strict=True):
        assert (i, t) == (j, u) and np.array_equal(x_t, y_t) and np.array_equal(x0, y0)
    loop.close()
    assert emu.memory == {}


def test_device_loops_keep_one_loop_per_thread(emu):
    spec = bound_spec()
    loops, seeds = device.DeviceLoops(EmuBackend(emu, spec)), np.array([1, 2], dtype=np.uint64)
    x, _ = denoise(loops, plan(3), seeds, None, None)
    worker = threading.Thread(target=denoise, args=(loops, plan(3), seeds, None, None))
    worker.start()
    worker.join()
    assert len(loops.loops) == 2 and np.array_equal(x, host(spec, plan(3), seeds)[0])
    loops.close()
    assert loops.loops == []


def test_nvrtc_cache_key_changes_with_the_sources(tmp_path, monkeypatch):
    for name in step_kernels.KERNEL_FILES:
        (tmp_path / name).write_bytes((step_kernels.kernel_dir() / name).read_bytes())
    before = step_kernels.source_hash(tmp_path)
    (tmp_path / "step.h").write_bytes((tmp_path / "step.h").read_bytes() + b"\n")
    assert step_kernels.source_hash(tmp_path) != before == step_kernels.source_hash()


# --- the TensorRT backend (fake tensorrt whose execute_async_v3 runs the toy model on emulated memory) --------


def cond_io():
    from tests.support import fake_tensorrt as ft

    return {
        "sample": (ft.TensorIOMode.INPUT, ft.DataType.FLOAT, (-1, 3, 8, 8)),
        "timestep": (ft.TensorIOMode.INPUT, ft.DataType.INT64, (-1,)),
        "class_labels": (ft.TensorIOMode.INPUT, ft.DataType.INT64, (-1,)),
        "out": (ft.TensorIOMode.OUTPUT, ft.DataType.FLOAT, (-1, 3, 8, 8)),
    }


@pytest.fixture
def trt_engine(fake_trt, emu, cond16, tmp_path, monkeypatch):
    import sys

    from ddengine.backends.trt import create
    from ddengine.export.trt_build import BuildConfig, build_engine
    from ddengine.model.load import load_model
    from tests.support import fake_tensorrt

    module = fake_tensorrt.make_module(io=cond_io())
    monkeypatch.setitem(sys.modules, "tensorrt", module)
    path = build_engine(BuildConfig(onnx_path=cond16, engine_path=tmp_path / "c.plan", batch=(1, 2, 4))).engine_path
    backend = create(load_model(cond16), engine=path)

    def execute(context, stream):
        rows = context.shapes["sample"][0]
        assert context.shapes == {"sample": (rows, 3, 8, 8), "timestep": (rows,), "class_labels": (rows,)}
        a, spec = dict(context.addresses), backend.spec

        def forward():
            x = emu.view(a["sample"], np.float32, rows * spec.per_image).reshape(rows, *spec.image_shape)
            out = forward32(
                x, emu.view(a["timestep"], np.int64, rows), emu.view(a["class_labels"], np.int64, rows), spec
            )
            emu.view(a["out"], np.float32, rows * spec.per_image)[:] = out.ravel()

        emu.submit(stream, forward)

    module.state.on_execute = execute
    return backend


def test_tensorrt_host_run_moves_inputs_and_outputs(trt_engine):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 3, 8, 8)).astype(np.float32)
    feeds = {"sample": x, "timestep": np.array([501, 3, 999]), "class_labels": np.array([0, 4, 2])}
    out = trt_engine.run(feeds, np.empty_like(x))
    assert np.array_equal(out, forward32(x, feeds["timestep"], feeds["class_labels"], trt_engine.spec))


def test_tensorrt_host_run_needs_labels_for_a_conditional_engine(trt_engine):
    from ddengine.backends.base import BackendError

    x = np.zeros((2, 3, 8, 8), np.float32)
    with pytest.raises(BackendError, match=r"input 'class_labels' \(class_labels\) was not given"):
        trt_engine.run({"sample": x, "timestep": np.ones(2, np.int64)}, np.empty_like(x))


def test_tensorrt_device_loop_with_graphs_equals_the_host_loop(trt_engine):
    from ddengine.backends.base import BackendError

    p, seeds, classes = plan(4), np.array([5, 6], dtype=np.uint64), np.array([1, 2])
    x, _ = denoise(device.DeviceLoop(trt_engine, graphs=True), p, seeds, classes, 2.0)
    assert np.array_equal(x, host(trt_engine.spec, p, seeds, classes, 2.0)[0])
    with pytest.raises(BackendError, match=r"10 forward rows are outside the engine's profile \[1, 8\]"):
        denoise(device.DeviceLoop(trt_engine), p, np.arange(5, dtype=np.uint64), np.zeros(5, np.int64), 2.0)


def test_concurrent_callers_get_their_own_execution_context(trt_engine):
    """A second `run` while the first is inside execute_async_v3 must not share its context (TensorRT#1300)."""
    import sys

    module = sys.modules["tensorrt"]
    forward, contexts = module.state.on_execute, []
    x = np.zeros((2, 3, 8, 8), np.float32)
    feeds = {"sample": x, "timestep": np.ones(2, np.int64), "class_labels": np.array([0, 1])}

    def execute(context, stream):
        contexts.append(context)
        if len(contexts) == 1:  # a second caller arrives mid-forward
            trt_engine.run({k: v[:1] for k, v in feeds.items()}, np.empty_like(x[:1]))
        forward(context, stream)

    module.state.on_execute = execute
    trt_engine.run(feeds, np.empty_like(x))
    assert len(contexts) == 2 and contexts[0] is not contexts[1]
    trt_engine.run(feeds, np.empty_like(x))  # afterwards both sessions are idle and reused
    assert contexts[2] in contexts[:2]
