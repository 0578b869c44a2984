"""ImageBatch, step-level batching: images of different requests, admitted at different steps with different plans,
guidance on or off and different classes, share every forward and still come out bit-identical to each request
sampled alone with Sampler.sample (the exactness property). Retiring keeps the others intact; a non-finite image
is marked at its own first non-finite step and disturbs no other image.
"""

import numpy as np
import pytest

from ddengine.backends.base import Backend
from ddengine.core.guidance import NO_UNCOND
from ddengine.runtime.batch import ImageBatch
from ddengine.runtime.conditioning import class_conditioning
from ddengine.runtime.sampler import Sampler, to_uint8
from tests.support.tiny_models import build_tiny_model

# name -> (global step at which the request is admitted, its Sampler.sample parameters)
STAGGERED = {
    "A": (0, dict(n=3, steps=5, method="ddim", seed=10, classes=[0, 1, 2], guidance=2.0)),
    "F": (1, dict(n=2, steps=3, method="ddim", eta=1.0, seed=60, classes=[1, 0], guidance=4.0)),
    "B": (2, dict(n=2, steps=7, method="ddpm", seed=20, classes=3)),  # conditional, no guidance
    "C": (3, dict(n=2, steps=4, method="ddim", eta=0.5, spacing="trailing", seed=30)),  # the null class
    "D": (5, dict(n=1, steps=6, method="ddim", seed=40, classes=1, guidance=0.0)),  # the null class alone
    "E": (5, dict(n=2, steps=5, method="ddim", seed=50, classes=[2, 3], guidance=1.0)),  # A's plan, conditional alone
    # the solvers (engine/core/solvers/) share the same forwards, each image with its own history slots
    "G": (1, dict(n=2, steps=6, method="dpmpp-2m", seed=70, classes=[0, 3], guidance=2.0)),
    "H": (2, dict(n=1, steps=5, method="dpmpp-3m", seed=80, classes=2)),
    "I": (0, dict(n=2, steps=4, method="unipc", seed=90, classes=[1, 1], guidance=3.0)),
    "J": (3, dict(n=1, steps=5, method="euler", seed=100, classes=0)),
    "K": (4, dict(n=2, steps=3, method="euler-a", seed=110, classes=[2, 0], guidance=1.5)),
}


class CountingBackend(Backend):
    """The sampler's backend, recording the rows and the distinct timesteps of each forward."""

    def __init__(self, backend):
        self.backend, self.rows, self.timesteps = backend, [], []

    def run(self, feeds, out):
        self.rows.append(len(out))
        self.timesteps.append(len(np.unique(feeds["timestep"])))
        return self.backend.run(feeds, out)


def admit(batch, sampler, name, kwargs):
    request = sampler.request(**kwargs)
    conditioning = class_conditioning(sampler.spec, request.classes, request.guidance, request.n)
    return batch.admit(sampler.plan(request), request.seeds, conditioning, [(name, j) for j in range(request.n)])


def run_staggered(sampler, schedule, capacity=16, on_retire=None):
    """Drive one ImageBatch like a server: admit each request at its step, retire images as they finish."""
    counting = CountingBackend(sampler.backend)
    batch = ImageBatch(counting, sampler.spec, capacity)
    results, pending, step = {}, sorted(schedule.items(), key=lambda kv: kv[1][0]), 0
    while pending or batch.n:
        while pending and pending[0][1][0] <= step:
            name, (_, kwargs) = pending.pop(0)
            admit(batch, sampler, name, kwargs)
        finished = batch.step()
        if len(finished):
            x, bad, tags = batch.retire(finished)
            for j, tag in enumerate(tags):
                results[tag] = (x[j], int(bad[j]), step)
            if on_retire is not None:
                on_retire(batch)
        step += 1
    return results, counting


def alone(sampler, kwargs):
    """(final float32 latents, uint8 images, records) of one request sampled by itself."""
    finals = {}

    def keep(i, t, x, first):
        if i == kwargs["steps"] - 1:
            finals[first] = x.copy()

    images, records = sampler.sample(**kwargs, callback=keep)
    return np.concatenate([finals[k] for k in sorted(finals)]), images, records


@pytest.fixture(scope="module")
def sampler(cond_model):
    return Sampler(cond_model, backend="ort-cpu")


def test_staggered_requests_are_bit_identical_to_each_request_alone(sampler):
    results, forwards = run_staggered(sampler, STAGGERED)
    rows = forwards.rows
    assert len(results) == sum(kwargs["n"] for _, kwargs in STAGGERED.values())
    for name, (start, kwargs) in STAGGERED.items():
        x_alone, images, records = alone(sampler, kwargs)
        for j in range(kwargs["n"]):
            x, bad, finished = results[(name, j)]
            assert finished == start + kwargs["steps"] - 1, (name, j)  # each image ran exactly its own plan
            assert bad == -1 and records[j]["status"] == "ok"
            assert np.array_equal(x, x_alone[j]), f"{name}[{j}] differs from the request sampled alone"
            assert np.array_equal(to_uint8(x[None])[0], images[j])
    # one shared forward per global step, never one per request
    assert len(rows) == max(start + kwargs["steps"] for start, kwargs in STAGGERED.values())
    assert max(rows) > max(2 * kwargs["n"] for _, kwargs in STAGGERED.values())  # requests really shared forwards
    assert max(forwards.timesteps) > 1  # ... at different steps of different plans


def test_the_coefficient_table_holds_only_the_plans_of_images_still_in_the_batch(sampler):
    """Every retire drops a drained plan's rows; the images in flight keep stepping through their own rows (their
    results stay bit-identical to each request alone)."""
    sizes = []

    def check(batch):
        live = {tag[0] for tag in batch.tags[: batch.n]}
        plans = {id(sampler.plan(sampler.request(**STAGGERED[name][1]))): name for name in live}
        want = sum(len(sampler.plan(sampler.request(**STAGGERED[name][1])).timesteps) for name in plans.values())
        assert len(batch.table) == len(batch.t_table) == want, live
        sizes.append(len(batch.table))

    results, _ = run_staggered(sampler, STAGGERED, on_retire=check)
    assert sizes[-1] == 0 and max(sizes) > min(sizes)
    for name, (_, kwargs) in STAGGERED.items():
        x_alone, _, _ = alone(sampler, kwargs)
        for j in range(kwargs["n"]):
            assert np.array_equal(results[(name, j)][0], x_alone[j]), name


def test_the_results_do_not_depend_on_who_else_is_in_the_batch(sampler):
    """Request A alone in a batch, with every other request, and admitted last: the same bits each time."""
    a = {"A": STAGGERED["A"]}
    solo, _ = run_staggered(sampler, a)
    crowded, _ = run_staggered(sampler, STAGGERED)
    late, _ = run_staggered(sampler, {**STAGGERED, "A": (6, STAGGERED["A"][1])})
    for j in range(3):
        assert np.array_equal(solo[("A", j)][0], crowded[("A", j)][0])
        assert np.array_equal(solo[("A", j)][0], late[("A", j)][0])


def test_retire_keeps_the_other_images_and_their_layout(sampler):
    spec = sampler.spec
    plan = sampler.plan(sampler.request(5, steps=6, classes=[0, 1, 2, 3, 0], guidance=2.0))
    batch = ImageBatch(sampler.backend, spec, 8)
    labels = np.array([0, 1, 2, 3, 0])
    guidance = [2.0, None, 3.0, None, 2.0]
    for j in range(5):  # one image at a time: per-image guidance on or off
        batch.admit(
            plan,
            np.array([100 + j], np.uint64),
            class_conditioning(spec, labels[j : j + 1], guidance[j], 1),
            [f"img{j}"],
        )
    for _ in range(2):
        batch.step()
    before_x, before_images = batch.x.copy(), batch.images[:5].copy()
    x, bad, tags = batch.retire([1, 2])
    assert tags == ["img1", "img2"] and bad.tolist() == [-1, -1]
    assert np.array_equal(x, before_x[[1, 2]])
    assert batch.n == 3 and batch.tags[:3] == ["img0", "img3", "img4"]
    assert np.array_equal(batch.x, before_x[[0, 3, 4]])
    kept = batch.images[:3]
    for field in ("seed", "row", "step", "guidance"):
        assert np.array_equal(kept[field], before_images[[0, 3, 4]][field]), field
    # the guided images (0 and 4) now own unconditional rows 3 and 4, right after the three own rows
    assert kept["uncond"].tolist() == [3, NO_UNCOND, 4] and batch.rows == 5
    assert batch.inputs["class_labels"][:5].tolist() == [0, 3, 0, spec.null_class, spec.null_class]
    # the kept images finish exactly as if nothing had been retired
    for _ in range(4):
        finished = batch.step()
    assert sorted(finished.tolist()) == [0, 1, 2]
    x_end, _, tags = batch.retire(finished)
    for j, tag in zip(range(3), tags):
        k = int(tag[3:])
        kwargs = dict(
            n=1, steps=6, seeds=[100 + k], classes=[int(labels[k])], guidance=guidance[k]
        )  # None: conditional
        x_alone, _, _ = alone(sampler, kwargs)
        assert np.array_equal(x_end[j], x_alone[0]), tag


def test_admit_refuses_what_the_batch_cannot_hold(sampler):
    plan = sampler.plan(sampler.request(2, steps=3))
    batch = ImageBatch(sampler.backend, sampler.spec, 2)
    batch.admit(plan, np.array([1, 2], np.uint64), class_conditioning(sampler.spec, None, None, 2), [0, 1])
    with pytest.raises(ValueError, match="cannot admit 1 images into a batch of 2 with capacity 2"):
        batch.admit(plan, np.array([3], np.uint64), class_conditioning(sampler.spec, None, None, 1), [2])


@pytest.mark.parametrize(
    "guidance, classes, want",
    [
        (None, None, ([4, 4], False)),  # no classes: the null class
        (0.0, [1, 2], ([4, 4], False)),  # g = 0: the null class alone
        (1.0, [1, 2], ([1, 2], False)),  # g = 1: the conditional model alone
        (None, [1, 2], ([1, 2], False)),
        (2.5, [1, 2], ([1, 2], True)),
    ],
)
def test_the_own_rows_labels_and_whether_an_unconditional_row_is_added(sampler, guidance, classes, want):
    conditioning = class_conditioning(sampler.spec, None if classes is None else np.array(classes), guidance, 2)
    own, null = conditioning.inputs["class_labels"]
    assert (own.tolist(), conditioning.guided) == want and null.tolist() == [4, 4]


@pytest.fixture(scope="module")
def late_nan(tmp_path_factory):
    """Class 2's output turns NaN once the timestep drops below 500 (finite before, and finite for other classes)."""
    path = tmp_path_factory.mktemp("nan") / "late_nan.onnx"
    build_tiny_model(path, num_classes=4, nan_below=(500, 2))
    return Sampler(path, backend="ort-cpu")


def first_below(plan, t0):
    return int(np.flatnonzero(plan.timesteps < t0)[0])


def test_nan_marks_only_the_images_that_went_non_finite_at_their_first_such_step(late_nan):
    schedule = {
        "bad_guided": (0, dict(n=2, steps=8, seed=1, classes=[2, 0], guidance=2.0)),  # image 0 goes bad
        "bad_late": (3, dict(n=2, steps=5, method="ddpm", seed=5, classes=[1, 2])),  # image 1 goes bad, admitted later
        "null_alone": (1, dict(n=1, steps=6, seed=9, classes=2, guidance=0.0)),  # class 2 asked, null class used: fine
        "fine": (2, dict(n=2, steps=4, seed=20, classes=[3, 1], guidance=3.0)),
    }
    results, _ = run_staggered(late_nan, schedule)
    for name, (_, kwargs) in schedule.items():
        request = late_nan.request(**kwargs)
        plan = late_nan.plan(request)
        x_alone, _, records = alone(late_nan, kwargs)
        for j in range(kwargs["n"]):
            x, bad, _ = results[(name, j)]
            goes_bad = request.classes[j] == 2 and request.guidance != 0.0
            want = first_below(plan, 500) if goes_bad else -1
            assert bad == want, (name, j)
            assert 0 < want or want == -1  # the check can tell "at step k" from "at step 0"
            if goes_bad:
                assert not np.isfinite(x).all()
                assert records[j]["status"] == "error" and f"at step {want}" in records[j]["error"]
            else:
                assert np.array_equal(x, x_alone[j]), (name, j)  # its NaN neighbours did not disturb it
                assert records[j]["status"] == "ok"


def test_scalar_timestep_models_run_once_per_distinct_timestep(tmp_path):
    """A graph with one timestep for the whole forward: images at different steps still step exactly."""
    build_tiny_model(tmp_path / "scalar.onnx", num_classes=3, scalar_timestep=True)
    sampler = Sampler(tmp_path / "scalar.onnx", backend="ort-cpu")
    schedule = {
        "a": (0, dict(n=2, steps=4, seed=1, classes=[0, 1], guidance=2.0)),
        "b": (2, dict(n=1, steps=3, seed=7, classes=2)),
    }
    results, forwards = run_staggered(sampler, schedule)
    assert set(forwards.timesteps) == {1}  # split by timestep: never one forward over rows at different timesteps
    assert len(forwards.rows) > max(kwargs["steps"] for _, kwargs in schedule.values())
    for name, (_, kwargs) in schedule.items():
        x_alone, _, _ = alone(sampler, kwargs)
        for j in range(kwargs["n"]):
            assert np.array_equal(results[(name, j)][0], x_alone[j])
