"""The Python API: shapes, determinism, batch invariance, concurrency, CFG, NaN isolation, and the float64 oracle."""
import threading

import numpy as np
import pytest
from tiny_models import tiny_forward64

from ddengine import _kernels
from ddengine.coeffs import NUM_COLUMNS, SIGMA
from ddengine.plan import make_plan
from ddengine.reference import reference_step
from ddengine.sampler import InvalidParameterError, Sampler, to_uint8
from ddengine.schedule import SchedulerConfig


@pytest.fixture(scope="module")
def cond(cond_model):
    return Sampler(cond_model, backend="ort-cpu")


@pytest.fixture(scope="module")
def uncond(uncond_model):
    return Sampler(uncond_model, backend="ort-cpu")


def test_shapes_records_and_default_seeds(cond):
    images, records = cond.sample(3, steps=4, seed=7, classes=[0, 1, 3])
    assert images.shape == (3, 8, 8, 3) and images.dtype == np.uint8
    assert [(r["index"], r["seed"], r["class"], r["status"], r["error"]) for r in records] == [
        (0, 7, 0, "ok", None), (1, 8, 1, "ok", None), (2, 9, 3, "ok", None)]
    explicit, _ = cond.sample(3, steps=4, seeds=[7, 8, 9], classes=[0, 1, 3])
    assert np.array_equal(images, explicit)


def test_same_request_is_bit_identical_and_seeds_differ(uncond):
    a, _ = uncond.sample(4, steps=5, method="ddpm", seed=3)
    b, _ = uncond.sample(4, steps=5, method="ddpm", seed=3)
    assert np.array_equal(a, b)
    assert all(not np.array_equal(a[i], a[j]) for i in range(4) for j in range(i))
    c, _ = uncond.sample(4, steps=5, method="ddpm", seed=4)
    assert np.array_equal(a[1:], c[:3]) and not np.array_equal(a[0], c[0])


@pytest.mark.parametrize("kwargs", [dict(method="ddim", eta=0.5), dict(method="ddpm"), dict(classes=[2, 0, 1, 3, 1, 0, 2], guidance=3.0)])
def test_image_i_is_the_same_whatever_the_batch_size(cond, kwargs):
    kwargs.setdefault("classes", 1)
    full, _ = cond.sample(7, steps=4, seed=11, batch_size=7, **kwargs)
    for batch_size in (1, 3, 16):
        images, _ = cond.sample(7, steps=4, seed=11, batch_size=batch_size, **kwargs)
        assert np.array_equal(images, full), batch_size


def test_eight_threads_on_one_sampler_equal_sequential(cond):
    jobs = [dict(n=3, steps=4, seed=10 * k, classes=k % 4, guidance=None if k % 2 else 2.0, method="ddim", eta=0.3 * (k % 3)) for k in range(8)]
    sequential = [cond.sample(**job)[0] for job in jobs]
    results, errors = [None] * 8, []

    def work(k):
        try:
            results[k] = cond.sample(**jobs[k])[0]
        except Exception as err:  # reported below; a thread cannot fail the test itself
            errors.append(err)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    assert all(np.array_equal(r, s) for r, s in zip(results, sequential))


def test_nan_for_one_class_fails_only_those_images(nan_model):
    sampler = Sampler(nan_model, backend="ort-cpu")
    images, records = sampler.sample(5, steps=3, classes=[0, 2, 1, 2, 3], batch_size=5)
    assert [r["status"] for r in records] == ["ok", "error", "ok", "error", "ok"]
    assert "non-finite" in records[1]["error"] and "step 0" in records[1]["error"]
    assert not images[[1, 3]].any()
    alone, _ = sampler.sample(1, steps=3, seeds=[2], classes=[1])
    assert np.array_equal(images[2], alone[0])  # the failing neighbours did not disturb it


def test_overflow_in_the_update_fails_only_that_image(tmp_path):
    from tiny_models import build_tiny_model

    build_tiny_model(tmp_path / "huge.onnx", num_classes=3, huge_class=1)
    sampler = Sampler(tmp_path / "huge.onnx")
    # the model output stays finite (3e38) but u + 5*(c - u) overflows float32 inside the fused step
    images, records = sampler.sample(3, steps=3, classes=[0, 1, 2], guidance=5.0)
    assert [r["status"] for r in records] == ["ok", "error", "ok"]
    assert "non-finite" in records[1]["error"] and not images[1].any()


def test_guidance_one_is_the_conditional_model(cond):
    guided, _ = cond.sample(3, steps=4, classes=[0, 1, 2], guidance=1.0)
    plain, _ = cond.sample(3, steps=4, classes=[0, 1, 2])
    assert np.abs(guided.astype(int) - plain.astype(int)).max() <= 1  # u + 1*(c - u) == c up to float32 rounding


def test_trajectory_snapshots(cond):
    _, records = cond.sample(2, steps=7, classes=1, trajectory=3)
    traj = records[0]["trajectory"]
    assert traj["steps"] == [0, 3, 6] and len(traj["timesteps"]) == 3
    assert traj["x_t"].shape == traj["x0"].shape == (3, 8, 8, 3)
    assert traj["x_t"].dtype == np.uint8


def _kernel_noise(seeds, step, shape):
    """z for `step`: a row that is all zeros except sigma = 1 makes the fused step return its noise."""
    z = np.zeros(shape, np.float32)
    row = np.zeros(NUM_COLUMNS, np.float32)
    row[SIGMA] = 1.0
    _kernels.step(z, np.zeros(shape, np.float32), row, seeds, step)
    return z.astype(np.float64)


@pytest.mark.parametrize("method,eta,guidance", [("ddim", 0.0, None), ("ddim", 0.7, 2.5), ("ddpm", 0.0, None), ("ddpm", 0.0, 1.5)])
def test_sampler_equals_float64_numpy_loop(linear_model, method, eta, guidance):
    path, spec = linear_model
    seeds, labels, steps = np.array([5, 6, 7], np.uint64), np.array([0, 2, 1]), 6
    sampler = Sampler(path, backend="ort-cpu")
    latents = {}
    images, _ = sampler.sample(3, steps=steps, method=method, eta=eta, seeds=seeds.tolist(), classes=labels.tolist(),
                               guidance=guidance, callback=lambda i, t, x, first: latents.__setitem__(i, x.copy()))
    plan = make_plan(SchedulerConfig.from_dict(spec.scheduler), steps, method=method, eta=eta)
    shape = (3, spec.channels, spec.height, spec.width)
    x = np.empty(shape, np.float32)
    _kernels.fill_noise(x, seeds)
    x = x.astype(np.float64)
    null = np.full(3, spec.null_class)
    for i, t in enumerate(plan.timesteps):
        m = tiny_forward64(x, t, labels, spec)
        if guidance is not None:
            m = np.concatenate([tiny_forward64(x, t, null, spec), m])
        x = reference_step(x, m, plan.coeffs[i], _kernel_noise(seeds, i, shape), guidance=guidance, clip=plan.clip)
        np.testing.assert_allclose(latents[i], x, rtol=0, atol=1e-5, err_msg=f"step {i}")
    assert np.abs(images.astype(int) - to_uint8(x).astype(int)).max() <= 1


@pytest.mark.parametrize("kwargs,message", [
    (dict(n=0), "n must be >= 1, got 0"),
    (dict(n=2, steps=0), "steps must be in [1, 1000], got 0"),
    (dict(n=2, steps=1001), "steps must be in [1, 1000], got 1001"),
    (dict(n=2, steps=2.5), "steps must be an integer, got 2.5"),
    (dict(n=2, steps=True), "steps must be an integer, got True"),
    (dict(n=2, batch_size=0), "batch_size must be >= 1, got 0"),
    (dict(n=2, eta=-0.1), "eta must be a finite number >= 0, got -0.1"),
    (dict(n=2, eta=float("nan")), "eta must be a finite number >= 0, got nan"),
    (dict(n=2, method="euler"), "method must be one of 'ddim', 'ddpm', got 'euler'"),
    (dict(n=2, method="ddpm", eta=0.5), "eta applies to method 'ddim' only"),
    (dict(n=2, spacing="random"), "spacing must be one of"),
    (dict(n=2, seed=-1), "seed must be in [0,"),
    (dict(n=2, seeds=[1]), "seeds must have n = 2 entries, got 1"),
    (dict(n=2, seed=3, seeds=[1, 2]), "pass seed or seeds, not both"),
    (dict(n=2, seeds=[1, 2**64]), "each seed must be in [0, 18446744073709551615], got 18446744073709551616"),
    (dict(n=2, classes=4), "class must be in [0, 3], got 4"),
    (dict(n=2, classes=[1, 2, 3]), "one int or a list of n = 2 ints, got 3"),
    (dict(n=2, classes=1, guidance=-1.0), "guidance must be a finite number >= 0, got -1.0"),
    (dict(n=2, classes=1, guidance=float("nan")), "guidance must be a finite number >= 0, got nan"),
    (dict(n=2, guidance=2.0), "needs classes"),
    (dict(n=2, trajectory=-2), "trajectory must be >= 1, got -2"),
])
def test_bad_parameters_name_expected_and_given(cond, kwargs, message):
    with pytest.raises(InvalidParameterError) as err:
        cond.sample(**kwargs)
    assert message in str(err.value)


def test_conditional_request_on_unconditional_model(uncond):
    with pytest.raises(InvalidParameterError, match="unconditional"):
        uncond.sample(2, classes=1)
    with pytest.raises(InvalidParameterError, match="unconditional"):
        uncond.sample(2, guidance=2.0)


def test_images_do_not_depend_on_the_thread_count(cond_model):
    kwargs = dict(steps=3, seed=2, classes=[0, 1, 2, 3, 0], guidance=1.5, batch_size=5)
    one, _ = Sampler(cond_model, threads=1).sample(5, **kwargs)
    two, _ = Sampler(cond_model, threads=2).sample(5, **kwargs)
    assert np.array_equal(one, two)


def test_gpu_backends_run_the_device_loop(cond):
    """A backend with device runners goes through ddengine.gpu_sampler; trajectories and callbacks stay on the host."""
    calls = []

    class FakeGpuSampling:
        def denoise(self, plan, seeds, labels, guidance):
            calls.append((len(plan), seeds.tolist(), labels.tolist(), guidance))
            x = np.zeros((len(seeds), 3, 8, 8), np.float32)
            x[seeds == 5] = np.nan  # the device loop reports image seed 5 as failed
            return x, np.where(seeds == 5, len(plan) - 1, -1)

        def close(self):
            pass

    cond._gpu = FakeGpuSampling()
    try:
        images, records = cond.sample(3, steps=4, seed=5, classes=[1, 2, 3], guidance=2.0, batch_size=2)
        assert calls == [(4, [5, 6], [4, 4, 1, 2], 2.0), (4, [7], [4, 3], 2.0)]
        assert [r["status"] for r in records] == ["error", "ok", "ok"] and (images[1:] == 128).all()
        calls.clear()
        cond.sample(2, steps=4, classes=1, trajectory=2)
        cond.sample(2, steps=4, classes=1, callback=lambda *a: None)
        assert calls == []
    finally:
        cond._gpu = None
