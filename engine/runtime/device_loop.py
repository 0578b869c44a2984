"""The denoising loop on the GPU, behind the host loop's interface (engine/runtime/loop.py):

    denoise(plan, seeds, conditioning, on_step=None) -> (x_0 float32 (B, C, H, W), nonfinite_step int64 (B,))

Per step, on one stream: [copy x into the guided images' unconditional rows] -> set_timesteps -> forward ->
fused step (x in place, nonfinite_step recorded per image) -> advance. A chunk is guided or not as a whole, so
its rows are engine/core/guidance.py's layout with every image guided or none. Rows, noise counters and guidance live on the
device in the per-image records (engine/kernels/host.py), so after one eager warm-up step the whole step is
captured once per (plan, batch, guided) and replayed for every later step and call (TensorRT: enqueue once
before capture, one execution context per captured graph; NVIDIA/TensorRT#2603, #3798). `graphs=False`
runs the same launches without capture. A DeviceLoop serves one thread at a time; DeviceLoops keeps one per thread.
"""

import collections
import threading

import numpy as np

from ddengine.core.guidance import forward_rows, layout_rows, uncond_rows
from ddengine.core.rows import SLOTS
from ddengine.gpu import driver
from ddengine.gpu.driver import check, use_device
from ddengine.gpu.memory import DeviceArray, Stream, copy_device
from ddengine.kernels.device import step_args, step_kernels
from ddengine.kernels.host import image_records
from ddengine.model.spec import OUTPUT_ROLE

MAX_STATES = 8  # (plan, batch, guided) states a loop keeps: their buffers, runner and captured graph


class DeviceLoop:
    """Samples with a GPU backend (TensorRTBackend, OrtCudaBackend, TorchCudaBackend) and the CUDA step kernel."""

    def __init__(self, backend, *, graphs=None, device=0):
        """graphs: None = use CUDA graphs when the backend allows capture, True = require them, False = never."""
        use_device(device)
        self.backend, self.spec, self.device, self.graphs = backend, backend.spec, device, graphs
        self.kernels = step_kernels(device)
        self.stream = backend.stream() or Stream()
        self.states = collections.OrderedDict()  # (plan key, batch, guided) -> _State, least recently used first

    def denoise(self, plan, seeds, conditioning, on_step=None, timers=None, snapshots=None, host_x=False):
        """Sample one chunk (its Conditioning, engine/core/guidance.py) on the device: on_step(i, t, x) after step i
        has run, x the latents copied to the host when host_x (else None); snapshots.take(i, t, x_t, x0) after the
        steps snapshots.wants(i), x0 the fused kernel's (the host loop's interface, engine/runtime/loop.py)."""
        seeds = np.ascontiguousarray(seeds, dtype=np.uint64)
        use_device(self.device)  # the caller's thread may not have made the context current yet
        n, guided = len(seeds), conditioning.guided
        state = self._state(plan, n, guided, keep_x0=snapshots is not None)
        everyone = np.full(n, guided)
        guidance = conditioning.guidance if guided else 0.0
        images = image_records(seeds, uncond=uncond_rows(everyone), guidance=guidance, noise_scale=plan.init_scale)
        state.images.upload(images, self.stream)
        if state.slots is not None:  # a multistep solver's history starts empty
            state.slots.upload(np.zeros((n, SLOTS, self.spec.per_image), dtype=np.float32), self.stream)
        for role, buffer in state.inputs.items():
            own, uncond = conditioning.inputs[role]
            rows = np.empty((forward_rows(n, guided), *own.shape[1:]), dtype=own.dtype)
            buffer.upload(layout_rows(own, uncond, np.flatnonzero(everyone), rows), self.stream)
        self.kernels.fill_noise(self.stream, state.args)
        shape = (n, *self.spec.image_shape)
        for i, t in enumerate(plan.timesteps.tolist()):
            x_t = state.model_x.download(self.stream, shape=shape) if snapshots and snapshots.wants(i) else None
            if state.use_graph and state.graph is None:
                self._step(state)  # warm-up: TensorRT must enqueue once before capture, torch warms its kernels
                body = lambda: self._step(state)  # noqa: E731
                state.graph = (
                    state.runner.capture(body) if state.runner.owns_capture else StreamGraph(self.stream, body)
                )
            elif state.use_graph:
                state.graph.launch()
            else:
                self._step(state)
            if x_t is not None:
                snapshots.take(i, t, x_t, state.x0.download(self.stream, shape=shape))
            if on_step is not None:
                self.stream.synchronize()
                on_step(i, t, state.model_x.download(self.stream, shape=shape) if host_x else None)
        x = state.model_x.download(self.stream, shape=shape)
        nonfinite_step = state.images.download(self.stream)["nonfinite_step"].astype(np.int64)
        return x, nonfinite_step

    def _step(self, state):
        """One denoising step's launches, in stream order (the body of the captured graph)."""
        k, s = self.kernels, self.stream
        if state.guided:  # the unconditional rows see the same x
            half = state.batch * self.spec.per_image * 4
            copy_device(state.model_x.ptr + half, state.model_x.ptr, half, s)
        k.set_timesteps(s, state.t_in.ptr, state.t_table.ptr, state.images.ptr, state.batch, state.t_in.dtype.name)
        state.runner.enqueue()
        k.step(s, state.args)
        k.advance(s, state.images.ptr, state.batch)

    def _state(self, plan, batch, guided, keep_x0=False):
        """The _State of (plan, batch, guided, keep_x0), made on first use; the least recently used past MAX_STATES
        is freed."""
        key = (plan.timesteps.tobytes(), plan.coeffs.tobytes(), batch, guided, keep_x0)
        if key in self.states:
            self.states.move_to_end(key)
            return self.states[key]
        while len(self.states) >= MAX_STATES:
            self.states.popitem(last=False)[1].close()
        self.states[key] = _State(self, plan, batch, guided, keep_x0)
        return self.states[key]

    def close(self):
        """Free graphs, runners and device buffers."""
        for state in self.states.values():
            state.close()
        self.states.clear()
        self.stream.close()


class _State:
    """Device buffers bound to one runner for one (plan, batch, guided): fixed addresses for graph replay."""

    def __init__(self, loop, plan, batch, guided, keep_x0=False):
        spec = loop.spec
        self.batch, self.guided = batch, guided
        rows = forward_rows(batch, guided)
        self.runner = loop.backend.open_runner(loop.stream)
        self.use_graph = _use_graph(loop.graphs, self.runner)
        self.model_x = DeviceArray((rows, *spec.image_shape), np.float32)  # x is its first `batch` rows
        self.out = DeviceArray((rows, *spec.image_shape), np.float32)
        self.images = DeviceArray(batch, image_records([]).dtype)
        self.table = DeviceArray.from_host(plan.rows_float32(), loop.stream)
        if not plan.integer_timesteps:
            raise ValueError(
                f"the device loop writes integer timesteps; {plan.method}'s schedule has fractional ones "
                f"(e.g. {plan.timesteps[1]:g}): use timestep_spacing 'leading' or 'trailing', or a CPU backend"
            )
        self.t_table = DeviceArray.from_host(np.asarray(plan.timesteps, dtype=np.int64), loop.stream)
        self.slots = DeviceArray((batch, SLOTS, spec.per_image), np.float32) if plan.multistep else None
        self.x0 = DeviceArray((batch, *spec.image_shape), np.float32) if keep_x0 else None  # the kernel's x0_out
        t_dtype = self.runner.dtype("timestep")
        if t_dtype.name not in ("int64", "float32"):
            raise ValueError(f"the model's timestep input is {t_dtype.name}; the step kernels write int64 or float32")
        if spec.io["timestep"].scalar:
            raise ValueError(
                "the device loop needs a per-row timestep input; this model's is a scalar (use the host loop)"
            )
        self.t_in = DeviceArray(rows, t_dtype)
        self.inputs = {
            role: DeviceArray(self.runner.shape(role, rows), self.runner.dtype(role))
            for role in spec.roles()
            if role not in ("sample", "timestep")
        }  # class_labels, encoder_hidden_states
        for role in ("sample", OUTPUT_ROLE):
            if self.runner.dtype(role) != np.float32:
                raise ValueError(
                    f"the model's {role} tensor is {self.runner.dtype(role)}; the CUDA step kernel needs float32"
                )
        self.runner.bind(
            rows,
            {
                "sample": self.model_x.ptr,
                "timestep": self.t_in.ptr,
                OUTPUT_ROLE: self.out.ptr,
                **{role: buffer.ptr for role, buffer in self.inputs.items()},
            },
        )
        slots = None if self.slots is None else self.slots.ptr
        x0 = None if self.x0 is None else self.x0.ptr
        self.args = step_args(
            self.model_x.ptr, self.out.ptr, self.table.ptr, self.images.ptr, batch, spec.per_image, slots, x0
        )
        self.graph = None

    def close(self):
        if self.graph is not None:
            self.graph.close()
            self.graph = None
        self.runner.close()
        buffers = (self.model_x, self.out, self.images, self.table, self.t_table, self.t_in, *self.inputs.values())
        for buffer in (*buffers, *(b for b in (self.slots, self.x0) if b is not None)):
            buffer.free()


class StreamGraph:
    """One step captured from `stream` into an executable CUDA graph (cuda.bindings' stream capture)."""

    def __init__(self, stream, body):
        _, runtime, _ = driver.import_cuda()
        self.stream = stream
        mode = runtime.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        check(runtime.cudaStreamBeginCapture(int(stream), mode))
        try:
            body()
        finally:
            graph = check(runtime.cudaStreamEndCapture(int(stream)))
        try:
            self.graph_exec = check(runtime.cudaGraphInstantiate(graph, 0))
        finally:
            check(runtime.cudaGraphDestroy(graph))

    def launch(self):
        _, runtime, _ = driver.import_cuda()
        check(runtime.cudaGraphLaunch(self.graph_exec, int(self.stream)))

    def close(self):
        _, runtime, _ = driver.import_cuda()
        check(runtime.cudaGraphExecDestroy(self.graph_exec))


def _use_graph(graphs, runner):
    if graphs and not runner.supports_capture:
        raise ValueError(f"graphs=True, but the {type(runner).__name__} backend cannot be captured into a CUDA graph")
    return runner.supports_capture if graphs is None else bool(graphs)


class DeviceLoops:
    """The Sampler's entry to the device loop: one DeviceLoop per thread, reused across calls."""

    def __init__(self, backend, *, graphs=None, device=0):
        self.backend, self.spec, self.graphs, self.device = backend, backend.spec, graphs, device
        self._local = threading.local()
        self.loops = []  # every loop created, for close()
        self._lock = threading.Lock()

    def denoise(self, plan, seeds, conditioning, **options):
        """This thread's DeviceLoop.denoise."""
        loop = getattr(self._local, "loop", None)
        if loop is None:
            loop = self._local.loop = DeviceLoop(self.backend, graphs=self.graphs, device=self.device)
            with self._lock:
                self.loops.append(loop)
        return loop.denoise(plan, seeds, conditioning, **options)

    def close(self):
        with self._lock:
            for loop in self.loops:
                loop.close()
            self.loops.clear()
        self._local = threading.local()
