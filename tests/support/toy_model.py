"""The conv-free tiny model m = gain*x + tscale*t + emb[label] (tests/support/tiny_models.py) as float32 numpy,
behind a host backend and with a bound I/O contract, for loop tests that need no ONNX file."""

import numpy as np

from ddengine.backends.base import Backend
from ddengine.model.spec import TensorSpec
from tests.support.tiny_models import GAIN, T_SCALE, class_table, tiny_spec


def bound_spec(num_classes=0, channels=1):
    """The tiny model's spec bound to its tensors (what load_model would give)."""
    spec = tiny_spec(channels=channels, num_classes=num_classes)
    image = (-1, channels, 8, 8)
    io = {"sample": TensorSpec("sample", "float32", image), "timestep": TensorSpec("timestep", "int64", (-1,))}
    if num_classes:
        io["class_labels"] = TensorSpec("class_labels", "int64", (-1,))
    io["out"] = TensorSpec("out", "float32", image)
    return spec.bind(io)


def forward32(x, t, labels, spec, nan_class=None):
    """The model in numpy float32, rounding as the toy kernels do (no FMA); t per row."""
    T = spec.scheduler["num_train_timesteps"]
    t = np.asarray(t).reshape(-1, 1, 1, 1)
    m = np.float32(GAIN) * x + np.float32(T_SCALE / T) * t.astype(np.float32)
    if spec.num_classes:
        m = m + class_table(spec.num_classes, spec.channels, nan_class)[labels][:, :, None, None]
    return m.astype(np.float32)


class ToyHostBackend(Backend):
    """A Backend on host arrays (the oracle side of device-loop tests)."""

    name = "toy"

    def __init__(self, spec, nan_class=None):
        self.spec, self.nan_class = spec, nan_class

    def run(self, feeds, out):
        out[:] = forward32(feeds["sample"], feeds["timestep"], feeds.get("class_labels"), self.spec, self.nan_class)
        return out

    def close(self):
        pass
