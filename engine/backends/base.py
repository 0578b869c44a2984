"""The backend protocol: load a model once, run one U-Net forward into a preallocated buffer, close."""
from typing import Protocol, runtime_checkable

import numpy as np


class BackendError(RuntimeError):
    """A backend could not be created or failed to run the model."""


@runtime_checkable
class Backend(Protocol):
    """One loaded model on one device; `run` must be safe to call from several threads at once."""

    name: str

    def run(self, sample: np.ndarray, timestep: int, class_labels: np.ndarray | None, out: np.ndarray) -> np.ndarray:
        """Write model(sample, timestep, class_labels) into `out` (float32, sample's shape) and return `out`."""
        ...

    def close(self) -> None:
        """Release the session and its memory; the backend is unusable afterwards."""
        ...
