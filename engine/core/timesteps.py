"""Inference timesteps: diffusers' `set_timesteps` spacings (Lin et al. 2023, arXiv 2305.08891, Table 2)."""

from typing import Literal, get_args

import numpy as np

Spacing = Literal["leading", "trailing", "linspace"]
SPACINGS = get_args(Spacing)


def _is_int(value):
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_steps(steps, num_train_timesteps):
    """Return `steps` as an int after checking it is an integer in [1, num_train_timesteps]."""
    if not _is_int(steps) or not 1 <= steps <= num_train_timesteps:
        raise ValueError(f"steps must be an integer in [1, {num_train_timesteps}] (num_train_timesteps), got {steps!r}")
    return int(steps)


def inference_timesteps(num_train_timesteps, steps, spacing, steps_offset=0):
    """Descending int64 timesteps exactly as diffusers' DDPM/DDIM `set_timesteps(steps)` builds them."""
    if not _is_int(num_train_timesteps) or num_train_timesteps < 1:
        raise ValueError(f"num_train_timesteps must be an integer >= 1, got {num_train_timesteps!r}")
    steps = check_steps(steps, num_train_timesteps)
    if not _is_int(steps_offset) or steps_offset < 0:
        raise ValueError(f"steps_offset must be an integer >= 0, got {steps_offset!r}")
    T = int(num_train_timesteps)
    if spacing == "linspace":
        return np.linspace(0, T - 1, steps).round()[::-1].copy().astype(np.int64)
    if spacing == "leading":  # the only spacing that applies steps_offset (may reach T: diffusers issue #10003)
        return (np.arange(0, steps) * (T // steps)).round()[::-1].astype(np.int64) + int(steps_offset)
    if spacing == "trailing":
        return np.round(np.arange(T, 0, -T / steps)).astype(np.int64) - 1
    raise ValueError(f"timestep_spacing must be one of {', '.join(map(repr, SPACINGS))}, got {spacing!r}")


def nonempty_list(value, name, expected, error):
    """list(value), or error naming `expected` when it is not iterable or empty (shared by the request validators)."""
    try:
        values = list(value)
    except TypeError:
        raise error(f"{name} must be {expected}, got {value!r}") from None
    if not values:
        raise error(f"{name} must be {expected}, got an empty list")
    return values


def check_timesteps(timesteps, num_train_timesteps):
    """Validate an explicit schedule (strictly descending integers in [0, T)) and return it as int64."""
    values = nonempty_list(timesteps, "timesteps", "a non-empty list of integers", ValueError)
    for i, t in enumerate(values):
        if not _is_int(t) or not 0 <= t < num_train_timesteps:
            raise ValueError(f"timesteps[{i}] must be an integer in [0, {num_train_timesteps - 1}], got {t!r}")
    for i in range(1, len(values)):
        if values[i] >= values[i - 1]:
            raise ValueError(
                f"timesteps must be strictly descending, got timesteps[{i - 1}] = {values[i - 1]} "
                f"followed by timesteps[{i}] = {values[i]}"
            )
    return np.asarray(values, dtype=np.int64)
