"""The backend contract: load a model once, run one U-Net forward into a preallocated buffer, close.

Every backend binds the model's tensors by the one I/O contract (`spec.io`, engine/model/spec.py): role -> name,
dtype and shape. Device backends (TensorRT, ONNX Runtime CUDA) also open DeviceRunners for the GPU loop.
"""

import os
from pathlib import Path

import numpy as np

from ddengine.model.spec import OUTPUT_ROLE


class BackendError(RuntimeError):
    """A backend could not be created or failed to run the model."""


class Backend:
    """One loaded model on one device; `run` must be safe to call from several threads at once.

    Each backend declares what it can do: `name` (its registry name), `precision` (what the forward computes in:
    "fp32", "bf16", "fp16"), `max_rows` (the most rows one forward takes, e.g. a TensorRT profile; None: no limit)
    and `opens_device_runners` (whether `open_runner` binds device buffers for the GPU loop). Whether a row's
    output is bit-identical whatever else shares its batch is measured, not declared (probe_batch_invariance).
    """

    name = "backend"
    precision = "fp32"
    max_rows = None
    opens_device_runners = False

    def run(self, feeds: dict, out: np.ndarray) -> np.ndarray:
        """Write the model's output for feeds (role -> array: sample, timestep per row, class_labels, ...) into `out`."""
        raise NotImplementedError

    def open_runner(self, stream):
        """A DeviceRunner on `stream` (only where opens_device_runners)."""
        raise BackendError(f"backend {self.name!r} runs on host arrays; it opens no device runners")

    def stream(self):
        """The stream a device loop must launch on (a backend that owns its streams), or None for a new one."""
        return None

    def close(self) -> None:
        """Release the session and its memory; the backend is unusable afterwards."""


def host_inputs(spec, feeds):
    """{tensor name: contiguous array in the graph's dtype} for a forward on host arrays (a scalar timestep: its first value)."""
    inputs = {}
    for role in spec.roles():
        tensor, value = spec.io[role], feeds.get(role)
        if value is None:
            raise BackendError(f"the model's input {tensor.name!r} ({role}) was not given")
        value = np.ascontiguousarray(value, dtype=tensor.dtype)
        inputs[tensor.name] = value[:1].reshape(()) if tensor.scalar else value
    return inputs


class DeviceRunner:
    """One forward context on one CUDA stream: tensors bound by device address for a row count, then enqueued.

    Subclasses bind one tensor (`_bind_tensor`) and enqueue; roles, dtypes and shapes come from `spec.io`.
    """

    supports_capture = False  # whether enqueue() may sit inside a captured CUDA graph
    owns_capture = False  # whether capture(body) must capture the step (its framework's allocator), not the loop

    def __init__(self, backend, stream):
        self.backend, self.stream, self.spec = backend, stream, backend.spec

    def dtype(self, role):
        """numpy dtype of a role's tensor ("sample", "timestep", "class_labels", ..., "out")."""
        return np.dtype(self.spec.io[role].dtype)

    def shape(self, role, rows):
        """The role's tensor shape for `rows` forward rows."""
        return self.spec.io[role].at(rows)

    def bind(self, rows, addresses):
        """Bind every input role and the output to the device buffers at `addresses` (role -> address)."""
        for role in (*self.spec.roles(), OUTPUT_ROLE):
            address = addresses.get(role)
            if address is None:
                raise BackendError(f"model tensor {self.spec.io[role].name!r} ({role}) needs a device buffer, got None")
            self._bind_tensor(role, self.spec.io[role].name, rows, int(address))
        self._bound()

    def _bind_tensor(self, role, name, rows, address):
        raise NotImplementedError

    def _bound(self):
        """Called once every tensor is bound."""

    def enqueue(self):
        raise NotImplementedError

    def close(self):
        """Release what the runner holds."""


def probe_batch_invariance(backend, spec, rows=7, seed=0):
    """Whether `backend` gives each of `rows` random rows (own timesteps and labels) bit for bit the output it gives
    that row alone: the property exact step-level batching needs (no vendor promises it; it is measured here)."""
    rng = np.random.default_rng(seed)
    T = spec.schedule.num_train_timesteps
    feeds = {
        "sample": rng.standard_normal((rows, *spec.image_shape)).astype(np.float32),
        "timestep": rng.integers(0, T, rows),
    }
    if spec.conditional:
        feeds["class_labels"] = rng.integers(0, spec.num_classes + (spec.null_class is not None), rows)
    if spec.text_conditional:
        feeds["encoder_hidden_states"] = rng.standard_normal(spec.io["encoder_hidden_states"].at(rows)).astype(
            np.float32
        )
    if spec.io["timestep"].scalar:
        feeds["timestep"][:] = feeds["timestep"][0]
    together = backend.run(feeds, np.empty((rows, *spec.image_shape), dtype=np.float32))
    for i in range(rows):
        alone = backend.run(
            {k: v[i : i + 1] for k, v in feeds.items()}, np.empty((1, *spec.image_shape), dtype=np.float32)
        )
        if not np.array_equal(alone[0].view(np.uint32), together[i].view(np.uint32)):
            return False
    return True


def physical_cores():
    """Physical cores this process may use (hyper-thread siblings counted once)."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = set()
    for cpu in cpus:
        try:
            core = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/core_id").read_text().strip()
            package = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/physical_package_id").read_text().strip()
        except OSError:
            core, package = str(cpu), "0"
        cores.add((package, core))
    return max(1, len(cores))
