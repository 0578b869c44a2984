"""The Python API: shapes, records, determinism, batch invariance, streaming, concurrency, CFG, NaN isolation."""

import hashlib
import importlib.metadata
import threading

import numpy as np
import pytest

import ddengine
from ddengine.core.plan import make_plan
from ddengine.runtime import capacity
from ddengine.runtime.sampler import Chunk, InvalidParameterError, Sampler, to_uint8
from tests.runtime.test_loop import reference_loop
from tests.support.kernel_oracle import batch_noise
from tests.support.tiny_models import build_tiny_model, tiny_forward64


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
        (0, 7, 0, "ok", None),
        (1, 8, 1, "ok", None),
        (2, 9, 3, "ok", None),
    ]
    explicit, _ = cond.sample(3, steps=4, seeds=[7, 8, 9], classes=[0, 1, 3])
    assert np.array_equal(images, explicit)


def test_records_carry_every_parameter_and_the_models_hash(cond_model, cond):
    _, records = cond.sample(
        2, steps=5, method="ddim", eta=0.25, seed=3, classes=[1, 2], guidance=1.75, batch_size=1, spacing="trailing"
    )
    want = {
        "steps": 5,
        "method": "ddim",
        "eta": 0.25,
        "guidance": 1.75,
        "spacing": "trailing",
        "model_sha256": hashlib.sha256(cond_model.read_bytes()).hexdigest(),
        "backend": "ort-cpu",
        "precision": "fp32",
        "ddengine_version": importlib.metadata.version("ddengine"),
    }
    for i, record in enumerate(records):
        assert {k: record[k] for k in want} == want
        assert (record["index"], record["seed"], record["class"]) == (i, 3 + i, 1 + i)
    # the record is enough to sample the image again
    r = records[1]
    again, _ = cond.sample(
        1,
        steps=r["steps"],
        method=r["method"],
        eta=r["eta"],
        seeds=[r["seed"]],
        classes=[r["class"]],
        guidance=r["guidance"],
        spacing=r["spacing"],
    )
    first, _ = cond.sample(
        2, steps=5, method="ddim", eta=0.25, seed=3, classes=[1, 2], guidance=1.75, spacing="trailing"
    )
    assert np.array_equal(again[0], first[1])


def test_the_recommended_guidance_is_used_and_recorded(tmp_path):
    build_tiny_model(tmp_path / "rec.onnx", channels=3, num_classes=4, recommended_guidance=3.0)
    sampler = Sampler(tmp_path / "rec.onnx", backend="ort-cpu")
    default, records = sampler.sample(2, steps=3, classes=[0, 3])
    explicit, _ = sampler.sample(2, steps=3, classes=[0, 3], guidance=3.0)
    plain, _ = sampler.sample(2, steps=3, classes=[0, 3], guidance=1.0)
    assert np.array_equal(default, explicit) and not np.array_equal(default, plain)
    assert [r["guidance"] for r in records] == [3.0, 3.0]
    _, records = sampler.sample(1, steps=2)  # no classes: no guidance
    assert records[0]["guidance"] is None and records[0]["class"] is None


def test_same_request_is_bit_identical_and_seeds_differ(uncond):
    a, _ = uncond.sample(4, steps=5, method="ddpm", seed=3)
    b, _ = uncond.sample(4, steps=5, method="ddpm", seed=3)
    assert np.array_equal(a, b)
    assert all(not np.array_equal(a[i], a[j]) for i in range(4) for j in range(i))
    c, _ = uncond.sample(4, steps=5, method="ddpm", seed=4)
    assert np.array_equal(a[1:], c[:3]) and not np.array_equal(a[0], c[0])


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(method="ddim", eta=0.5),
        dict(method="ddpm"),
        dict(classes=[2, 0, 1, 3, 1, 0, 2], guidance=3.0),
        dict(classes="all", guidance=0.0),
        dict(classes=[1, 2], guidance=1.0),
    ],
)
def test_image_i_is_the_same_whatever_the_batch_size(cond, kwargs):
    kwargs.setdefault("classes", 1)
    full, _ = cond.sample(7, steps=4, seed=11, batch_size=7, **kwargs)
    for batch_size in (1, 3, 16):
        images, _ = cond.sample(7, steps=4, seed=11, batch_size=batch_size, **kwargs)
        assert np.array_equal(images, full), batch_size


def test_stream_yields_the_chunks_in_order_and_they_make_sample(cond):
    kwargs = dict(steps=3, seed=5, classes=[0, 1, 2], guidance=2.0, batch_size=3)
    chunks = list(cond.stream(8, **kwargs))
    assert all(isinstance(c, Chunk) for c in chunks)
    assert [(c.start, len(c.images), len(c.records)) for c in chunks] == [(0, 3, 3), (3, 3, 3), (6, 2, 2)]
    assert [r["index"] for c in chunks for r in c.records] == list(range(8))
    images, records = cond.sample(8, **kwargs)
    assert np.array_equal(np.concatenate([c.images for c in chunks]), images)
    assert [r for c in chunks for r in c.records] == records


def test_stream_validates_at_once_and_keeps_nothing(cond, monkeypatch):
    with pytest.raises(InvalidParameterError, match=r"n must be in \[1, 10000000\], got 0"):
        cond.stream(0)  # before the first chunk is asked for
    # 100,000 images kept by sample() would not fit; streamed, only one chunk exists at a time
    monkeypatch.setattr(capacity, "available_memory", lambda: 50 * 2**20)
    with pytest.raises(InvalidParameterError, match="images kept in memory.*stream the images"):
        cond.sample(100_000, steps=2, batch_size=4)
    first = next(iter(cond.stream(100_000, steps=2, batch_size=4)))
    alone, _ = cond.sample(4, steps=2, batch_size=4)
    assert first.start == 0 and np.array_equal(first.images, alone)


def test_progress_is_monotone_and_reaches_the_total(cond):
    calls = []
    cond.sample(7, steps=3, batch_size=3, classes=1, progress=lambda done, total: calls.append((done, total)))
    assert {total for _, total in calls} == {21}
    done = [d for d, _ in calls]
    assert done == sorted(done) and done[-1] == 21 and len(done) == 3 * 3  # after every step of every chunk


def test_eight_threads_on_one_sampler_equal_sequential(cond):
    jobs = [
        dict(
            n=3, steps=4, seed=10 * k, classes=k % 4, guidance=None if k % 2 else 2.0, method="ddim", eta=0.3 * (k % 3)
        )
        for k in range(8)
    ]
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
    assert records[1]["error"] == "image 1 (seed 1) became non-finite (NaN/inf) at step 0"
    assert not images[[1, 3]].any()
    alone, _ = sampler.sample(1, steps=3, seeds=[2], classes=[1])
    assert np.array_equal(images[2], alone[0])  # the failing neighbours did not disturb it


def test_overflow_in_the_update_fails_only_that_image(tmp_path):
    build_tiny_model(tmp_path / "huge.onnx", num_classes=3, huge_class=1)
    sampler = Sampler(tmp_path / "huge.onnx", backend="ort-cpu")
    # the model output stays finite (3e38) but u + 5*(c - u) overflows float32 inside the fused step
    images, records = sampler.sample(3, steps=3, classes=[0, 1, 2], guidance=5.0)
    assert [r["status"] for r in records] == ["ok", "error", "ok"]
    assert "non-finite" in records[1]["error"] and not images[1].any()


def test_guidance_one_is_the_conditional_model_and_zero_the_null_class(cond):
    guided, _ = cond.sample(3, steps=4, classes=[0, 1, 2], guidance=1.0)
    plain, _ = cond.sample(3, steps=4, classes=[0, 1, 2])
    assert np.array_equal(guided, plain)  # g = 1 runs the conditional model alone
    null, _ = cond.sample(3, steps=4, classes=[0, 1, 2], guidance=0.0)
    unconditional, _ = cond.sample(3, steps=4)
    assert np.array_equal(null, unconditional) and not np.array_equal(null, plain)


def test_trajectory_snapshots_against_the_float64_model(linear_model):
    path, spec = linear_model
    sampler = Sampler(path, backend="ort-cpu")
    seeds, classes, g = [4, 9], [2, 0], 2.0
    _, records = sampler.sample(2, steps=7, seeds=seeds, classes=classes, guidance=g, trajectory=3)
    plan = make_plan(spec.schedule, 7)
    x_T = batch_noise(np.array(seeds, np.uint64), (2, *spec.image_shape), 0, 1)
    u, c = (
        tiny_forward64(x_T, plan.timesteps[0], np.full(2, spec.null_class), spec),
        tiny_forward64(x_T, plan.timesteps[0], classes, spec),
    )
    row = plan.coeffs[0]
    x0 = np.clip(row[0] * x_T + row[1] * (u + g * (c - u)), -1, 1)  # columns ax, am
    for j, record in enumerate(records):
        traj = record["trajectory"]
        assert traj["steps"] == [0, 3, 6] and traj["timesteps"] == plan.timesteps[[0, 3, 6]].tolist()
        assert traj["x_t"].shape == traj["x0"].shape == (3, 8, 8, 1) and traj["x_t"].dtype == np.uint8
        assert np.abs(traj["x_t"][0].astype(int) - to_uint8(x_T[j : j + 1])[0].astype(int)).max() <= 1
        assert np.abs(traj["x0"][0].astype(int) - to_uint8(x0[j : j + 1])[0].astype(int)).max() <= 1


def test_sampler_chunks_equal_the_float64_reference_loop(linear_model):
    path, spec = linear_model
    sampler = Sampler(path, backend="ort-cpu")
    seeds, classes = np.array([5, 6, 7, 8, 9], np.uint64), np.array([0, 2, 1, 1, 0])
    finals = {}

    def keep(i, t, x, first):
        if i == 5:
            finals[first] = x.copy()

    images, _ = sampler.sample(
        5,
        steps=6,
        method="ddim",
        eta=0.6,
        seeds=seeds.tolist(),
        classes=classes.tolist(),
        guidance=2.5,
        batch_size=2,
        callback=keep,
    )
    plan = make_plan(spec.schedule, 6, eta=0.6)
    want, _ = reference_loop(spec, plan, seeds, classes, 2.5)
    assert sorted(finals) == [0, 2, 4]
    np.testing.assert_allclose(np.concatenate([finals[k] for k in sorted(finals)]), want, rtol=0, atol=2e-5)
    assert np.abs(images.astype(int) - to_uint8(want).astype(int)).max() <= 1


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(n=0), "n must be in [1, 10000000], got 0"),
        (dict(n=2, steps=1001), "steps must be in [1, 1000], got 1001"),
        (dict(n=2, method="ddpm", eta=0.5), "eta applies to method 'ddim' only"),
        (dict(n=2, classes=4), "class must be in [0, 3], got 4"),
        (dict(n=2, guidance=2.0), "needs classes"),
        (dict(n=2, trajectory=-2), "trajectory must be >= 1, got -2"),
    ],
)
def test_bad_parameters_name_expected_and_given(cond, kwargs, message):
    with pytest.raises(InvalidParameterError) as err:
        cond.sample(**kwargs)
    assert message in str(err.value)


def test_conditional_request_on_unconditional_model(uncond):
    with pytest.raises(InvalidParameterError, match="unconditional"):
        uncond.sample(2, classes=1)
    with pytest.raises(InvalidParameterError, match="needs a class-conditional model with a null class"):
        uncond.sample(2, guidance=2.0)


def test_bad_thread_counts(cond_model):
    with pytest.raises(InvalidParameterError, match=r"threads must be in \[1, \d+\], got 0"):
        Sampler(cond_model, threads=0)


def test_images_do_not_depend_on_the_thread_count(cond_model):
    kwargs = dict(steps=3, seed=2, classes=[0, 1, 2, 3, 0], guidance=1.5, batch_size=5)
    one, _ = Sampler(cond_model, threads=1, backend="ort-cpu").sample(5, **kwargs)
    two, _ = Sampler(cond_model, threads=2, backend="ort-cpu").sample(5, **kwargs)
    assert np.array_equal(one, two)


def test_device_loops_run_the_chunks_callbacks_and_snapshots_included(cond_model):
    """A backend with device runners samples through its device loop, with callbacks (host_x) and trajectories
    (snapshots) too; only a start of the caller's (image-to-image) uses the host loop."""
    calls, hooks = [], []

    class FakeDeviceLoop:
        def denoise(self, plan, seeds, conditioning, on_step=None, timers=None, snapshots=None, host_x=False):
            own, _ = conditioning.inputs["class_labels"]
            calls.append((len(plan), seeds.tolist(), own.tolist(), conditioning.guidance))
            hooks.append((type(snapshots).__name__, host_x))
            x = np.zeros((len(seeds), 3, 8, 8), np.float32)
            for i, t in enumerate(plan.timesteps.tolist()):
                if snapshots is not None and snapshots.wants(i):
                    snapshots.take(i, t, x, x)
                on_step(i, t, x if host_x else None)
            x[seeds == 5] = np.nan  # the device loop reports image seed 5 as failed
            return x, np.where(seeds == 5, len(plan) - 1, -1)

        def close(self):
            pass

    sampler = Sampler(cond_model, backend="ort-cpu")
    sampler.device_loop = FakeDeviceLoop()
    progress = []
    images, records = sampler.sample(
        3,
        steps=4,
        seed=5,
        classes=[1, 2, 3],
        guidance=2.0,
        batch_size=2,
        progress=lambda done, total: progress.append(done),
    )
    assert calls == [(4, [5, 6], [1, 2], 2.0), (4, [7], [3], 2.0)]
    assert [r["status"] for r in records] == ["error", "ok", "ok"] and "at step 3" in records[0]["error"]
    assert not images[0].any() and (images[1:] == 128).all()  # x = 0 is mid-grey in [-1, 1]
    assert progress[-1] == 12
    hooks.clear()
    sampler.sample(2, steps=4, classes=1, trajectory=2)
    sampler.sample(2, steps=4, classes=1, callback=lambda *a: None)
    assert hooks == [("Snapshots", False), ("NoneType", True)]
    calls.clear()
    picture = np.full((8, 8, 3), 100, np.uint8)
    on_host, _ = sampler.sample(2, steps=4, classes=1, image=picture, strength=0.5)
    assert calls == []
    sampler.device_loop = None
    assert np.array_equal(on_host, sampler.sample(2, steps=4, classes=1, image=picture, strength=0.5)[0])


def test_context_manager_closes_the_backend(cond_model):
    from ddengine.backends import BackendError

    with Sampler(cond_model, backend="ort-cpu") as sampler:
        sampler.sample(1, steps=2)
    with pytest.raises(BackendError, match="closed"):
        sampler.sample(1, steps=2)


def test_public_api():
    assert ddengine.Sampler is Sampler
    with pytest.raises(AttributeError):
        ddengine.NoSuchThing  # noqa: B018


@pytest.mark.parametrize("value_range", [(-1.0, 1.0), (0.0, 1.0), (0.0, 255.0)])
def test_to_uint8_maps_the_value_range_onto_0_255(value_range):
    lo, hi = value_range
    x = np.array([lo - 1, lo, (lo + hi) / 2, hi, hi + 5, lo + (hi - lo) * 0.2], np.float32).reshape(1, 1, 1, 6)
    out = to_uint8(x, value_range)
    assert out.shape == (1, 1, 6, 1) and out.dtype == np.uint8
    assert out.reshape(-1).tolist() == [0, 0, 128, 255, 255, 51]


@pytest.mark.parametrize("hook", ["progress", "callback"])
def test_a_hook_that_raises_ends_its_request_and_the_sampler_goes_on(cond, hook):
    class Stop(Exception):
        pass

    def fail(*args):
        raise Stop("the caller gave up")

    with pytest.raises(Stop, match="the caller gave up"):
        cond.sample(3, steps=4, seed=2, **{hook: fail})
    again, records = cond.sample(3, steps=4, seed=2)
    assert [r["status"] for r in records] == ["ok"] * 3 and np.array_equal(again, cond.sample(3, steps=4, seed=2)[0])
