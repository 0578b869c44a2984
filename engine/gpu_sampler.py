"""The denoising loop on the GPU: U-Net forward and fused step on one stream, one CUDA graph per batch size.

Per step: [copy x into both CFG halves] -> set_timesteps -> engine forward -> fused step (x in place)
-> advance. The step index, timestep table and coefficient rows live on the device, so after one eager
warm-up step the whole step is captured once per batch size and replayed for every later step and call
(TensorRT: enqueue once before capture, one execution context per captured graph; NVIDIA/TensorRT#2603,
#3798). `graphs=False` runs the same launches without capture. A GpuLoop serves one thread at a time;
GpuSampling keeps one per thread.
"""
import threading

import numpy as np

from ddengine.cuda_step import DeviceArray, Stream, check, copy_device, import_cuda, step_kernels, use_device


class GpuLoop:
    """Samples one StepPlan with a GPU backend (TensorRTBackend or OrtCudaBackend) and the CUDA step kernel."""

    def __init__(self, backend, plan, *, guidance=None, graphs=None, device=0):
        """graphs: None = use CUDA graphs when the backend allows capture, True = require them, False = never."""
        use_device(device)
        self.backend, self.spec, self.device = backend, backend.spec, device
        self.kernels = step_kernels(device)
        self.stream = Stream()
        self.guidance = None if guidance is None else float(guidance)
        self.clip = plan.clip
        self.steps = len(plan.timesteps)
        self.coeffs = DeviceArray.from_host(plan.rows_float32().astype(np.float32), self.stream)
        self.t_table = DeviceArray.from_host(np.asarray(plan.timesteps, dtype=np.int64), self.stream)
        self.per_image = self.spec.channels * self.spec.height * self.spec.width
        self.graphs = graphs
        self._states = {}  # batch size -> _BatchState (buffers, runner, graph)

    def denoise(self, seeds, labels=None):
        """x_0 (float32, (B, C, H, W)) for per-image uint64 `seeds` and the model's labels ([null; classes] under CFG)."""
        seeds = np.ascontiguousarray(seeds, dtype=np.uint64)
        use_device(self.device)  # the caller's thread may not have made the context current yet
        state = self._state(len(seeds))
        state.seeds.upload(seeds, self.stream)
        if state.labels is not None:
            if labels is None or len(labels) != state.model_batch:
                got = None if labels is None else len(labels)
                raise ValueError(f"labels must hold {state.model_batch} class ids for {len(seeds)} images, got {got}")
            state.labels.upload(labels, self.stream)
        self.kernels.fill_noise(self.stream, state.x, state.seeds, state.batch, self.per_image)
        state.step_index.upload(np.zeros(1, dtype=np.int32), self.stream)
        first = 0
        if state.use_graph and state.graph_exec is None:
            self._step(state)  # warm-up: TensorRT must enqueue once before capture
            state.graph_exec = self._capture(state)
            first = 1
        for _ in range(first, self.steps):
            if state.use_graph:
                _, runtime, _ = import_cuda()
                check(runtime.cudaGraphLaunch(state.graph_exec, int(self.stream)))
            else:
                self._step(state)
        return state.x.download(self.stream)

    def _step(self, state):
        """One denoising step's launches, in stream order (the body of the captured graph)."""
        k, s = self.kernels, self.stream
        if state.model_x is not None:  # CFG: the forward sees [x; x]
            half = state.x.nbytes
            copy_device(state.model_x.ptr, state.x.ptr, half, s)
            copy_device(state.model_x.ptr + half, state.x.ptr, half, s)
        k.set_timesteps(s, state.timesteps, self.t_table, state.step_index, state.t_count, state.t_dtype)
        state.runner.enqueue()
        k.step(s, state.x, state.out, self.coeffs, state.step_index, state.seeds, state.batch, self.per_image,
               self.guidance, self.clip)
        k.advance(s, state.step_index)

    def _capture(self, state):
        """Record one step (every launch above) into an executable CUDA graph."""
        _, runtime, _ = import_cuda()
        mode = runtime.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        check(runtime.cudaStreamBeginCapture(int(self.stream), mode))
        try:
            self._step(state)
        finally:
            graph = check(runtime.cudaStreamEndCapture(int(self.stream)))
        try:
            return check(runtime.cudaGraphInstantiate(graph, 0))
        finally:
            check(runtime.cudaGraphDestroy(graph))

    def _state(self, batch):
        if batch not in self._states:
            self._states[batch] = _BatchState(self, batch)
        return self._states[batch]

    def close(self):
        """Free graphs, runners and device buffers."""
        for state in self._states.values():
            state.close()
        self._states.clear()
        for buffer in (self.coeffs, self.t_table):
            buffer.free()
        self.stream.close()


class _BatchState:
    """Device buffers bound to one execution context for one batch size (fixed addresses for graph replay)."""

    def __init__(self, loop, batch):
        spec, cfg = loop.spec, loop.guidance is not None
        if cfg and not spec.conditional:
            raise ValueError("guidance needs a class-conditional model; this model is unconditional")
        self.batch, self.model_batch = batch, 2 * batch if cfg else batch
        image = (spec.channels, spec.height, spec.width)
        self.runner = loop.backend.open_runner(loop.stream)
        self.use_graph = _use_graph(loop.graphs, self.runner)
        self.x = DeviceArray((batch, *image), np.float32)
        self.model_x = DeviceArray((self.model_batch, *image), np.float32) if cfg else None
        self.out = DeviceArray((self.model_batch, *image), np.float32)
        self.seeds = DeviceArray(batch, np.uint64)
        self.step_index = DeviceArray(1, np.int32)
        self.t_dtype = self.runner.dtype("timestep")
        if self.t_dtype.name not in ("int64", "float32"):
            raise ValueError(f"the model's timestep input is {self.t_dtype.name}; the step kernels write int64 or float32")
        t_shape = self.runner.shape("timestep", self.model_batch)
        self.t_count = int(np.prod(t_shape, dtype=np.int64)) if t_shape else 1
        self.timesteps = DeviceArray(self.t_count, self.t_dtype)
        self.labels = DeviceArray(self.model_batch, self.runner.dtype("class_labels")) if spec.conditional else None
        self.runner.bind(self.model_batch, sample=self.model_x if cfg else self.x, timestep=self.timesteps,
                         class_labels=self.labels, out=self.out)
        self.graph_exec = None

    def close(self):
        if self.graph_exec is not None:
            _, runtime, _ = import_cuda()
            check(runtime.cudaGraphExecDestroy(self.graph_exec))
            self.graph_exec = None
        self.runner.close()
        for buffer in (self.x, self.model_x, self.out, self.seeds, self.step_index, self.timesteps, self.labels):
            if buffer is not None:
                buffer.free()


def _use_graph(graphs, runner):
    if graphs and not runner.supports_capture:
        raise ValueError(f"graphs=True, but the {type(runner).__name__} backend cannot be captured into a CUDA graph")
    return runner.supports_capture if graphs is None else bool(graphs)


def uses_gpu_loop(backend):
    """True for backends that expose device runners (TensorRTBackend, OrtCudaBackend)."""
    return callable(getattr(backend, "open_runner", None))


class GpuSampling:
    """The Sampler's entry to the GPU loop: one GpuLoop per (plan, guidance) and per thread, reused across calls."""

    def __init__(self, backend, *, graphs=None, device=0):
        self.backend, self.graphs, self.device = backend, graphs, device
        self._local = threading.local()
        self._all = []  # every loop created, for close()
        self._lock = threading.Lock()

    def denoise(self, plan, seeds, labels, guidance):
        """(x_0 float32 (B, C, H, W), bad int64 (B,)): bad[j] = last step index if image j ended non-finite, else -1."""
        loops = getattr(self._local, "loops", None)
        if loops is None:
            loops = self._local.loops = {}
        key = (plan.timesteps.tobytes(), plan.coeffs.tobytes(), plan.clip, guidance)
        if key not in loops:
            loops[key] = GpuLoop(self.backend, plan, guidance=guidance, graphs=self.graphs, device=self.device)
            with self._lock:
                self._all.append(loops[key])
        x = loops[key].denoise(seeds, labels)
        finite = np.isfinite(x.reshape(len(x), -1)).all(axis=1)
        return x, np.where(finite, -1, len(plan.timesteps) - 1).astype(np.int64)

    def close(self):
        with self._lock:
            for loop in self._all:
                loop.close()
            self._all.clear()
        self._local = threading.local()
