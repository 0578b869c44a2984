"""Inference timesteps against diffusers' set_timesteps (the oracle), and the refusals."""

import numpy as np
import pytest

diffusers = pytest.importorskip("diffusers")

from ddengine.core.timesteps import check_steps, check_timesteps, inference_timesteps  # noqa: E402

T = 1000


@pytest.mark.parametrize("scheduler_cls", [diffusers.DDPMScheduler, diffusers.DDIMScheduler])
def test_every_step_count_matches_diffusers(scheduler_cls):
    mismatches = []
    for spacing, offset in [
        ("leading", 0),
        ("leading", 1),
        ("trailing", 0),
        ("trailing", 1),
        ("linspace", 0),
        ("linspace", 1),
    ]:
        sched = scheduler_cls(num_train_timesteps=T, timestep_spacing=spacing, steps_offset=offset)
        for n in range(1, T + 1):
            sched.set_timesteps(n)
            expected = sched.timesteps.numpy()
            ours = inference_timesteps(T, n, spacing, offset)
            if ours.dtype != np.int64 or not np.array_equal(ours, expected):
                mismatches.append(f"{spacing}+offset{offset} n={n}: ours {ours[:4]}... expected {expected[:4]}...")
    assert not mismatches, f"{len(mismatches)} mismatches, first: {mismatches[:5]}"


@pytest.mark.parametrize("T_small", [1, 7, 10, 999])
def test_other_train_lengths_match_diffusers(T_small):
    for spacing in ("leading", "trailing", "linspace"):
        sched = diffusers.DDIMScheduler(num_train_timesteps=T_small, timestep_spacing=spacing, steps_offset=1)
        for n in sorted({n for n in (1, 2, 3, T_small // 2, T_small) if 1 <= n <= T_small}):
            sched.set_timesteps(n)
            assert np.array_equal(inference_timesteps(T_small, n, spacing, 1), sched.timesteps.numpy()), (spacing, n)


def test_more_steps_than_training_refused_like_diffusers():
    sched = diffusers.DDPMScheduler(num_train_timesteps=T)
    with pytest.raises(ValueError):
        sched.set_timesteps(T + 1)
    with pytest.raises(ValueError, match=r"steps must be an integer in \[1, 1000\].*got 1001"):
        inference_timesteps(T, T + 1, "leading")


@pytest.mark.parametrize("bad", [0, -3, 1001, 2.5, 50.0, True, False, "50", None, np.float64(3.0)])
def test_bad_step_counts_name_expected_and_given(bad):
    with pytest.raises(
        ValueError,
        match=r"steps must be an integer in \[1, 1000\].*got " + repr(bad).replace("(", r"\(").replace(")", r"\)"),
    ):
        check_steps(bad, T)


def test_numpy_integer_steps_accepted():
    assert np.array_equal(inference_timesteps(T, np.int32(50), "trailing"), inference_timesteps(T, 50, "trailing"))


def test_unknown_spacing_named():
    with pytest.raises(
        ValueError, match=r"timestep_spacing must be one of 'leading', 'trailing', 'linspace', got 'karras'"
    ):
        inference_timesteps(T, 10, "karras")


def test_negative_offset_refused():
    with pytest.raises(ValueError, match=r"steps_offset must be an integer >= 0, got -1"):
        inference_timesteps(T, 10, "leading", -1)


def test_explicit_timesteps_validated():
    assert check_timesteps([999, 500, 3, 0], T).tolist() == [999, 500, 3, 0]
    assert check_timesteps(np.array([10, 5]), T).dtype == np.int64
    with pytest.raises(ValueError, match=r"strictly descending.*timesteps\[1\] = 999"):
        check_timesteps([999, 999], T)
    with pytest.raises(ValueError, match=r"strictly descending.*timesteps\[2\] = 600"):
        check_timesteps([999, 500, 600], T)
    with pytest.raises(ValueError, match=r"timesteps\[0\] must be an integer in \[0, 999\], got 1000"):
        check_timesteps([1000, 5], T)
    with pytest.raises(ValueError, match=r"timesteps\[1\] must be an integer in \[0, 999\], got -1"):
        check_timesteps([5, -1], T)
    with pytest.raises(ValueError, match=r"timesteps\[1\] must be an integer.*got 2.5"):
        check_timesteps([5, 2.5], T)
    with pytest.raises(ValueError, match=r"timesteps\[0\] must be an integer.*got True"):
        check_timesteps([True], T)
    with pytest.raises(ValueError, match="non-empty"):
        check_timesteps([], T)
