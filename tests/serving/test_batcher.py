"""StepBatcher: concurrent requests share forwards yet every image equals solo sampling; cancel, timeout, queue
bound, NaN isolation and draining."""

import math
import threading
import time
from concurrent.futures import CancelledError

import numpy as np
import pytest

from ddengine.runtime import parts as parts_module
from ddengine.runtime.params import InvalidParameterError
from ddengine.runtime.sampler import Sampler
from ddengine.serving.batcher import BatcherClosed, QueueFull, StepBatcher
from ddengine.serving.policies import (
    Decision,
    Fifo,
    Gang,
    OneAtATime,
    PolicyError,
    RequestLevel,
    ShortestRemainingFirst,
)
from tests.support.clock import Clock
from tests.support.tiny_pipeline import tiny_sd  # noqa: F401  (fixture)

# 12 requests: mixed steps, methods, eta, guidance on and off, classes, seeds; some with n > max_batch (4).
MIXED = [
    dict(n=3, steps=10, method="ddim", classes=[0, 1], guidance=2.0, seed=1),
    dict(n=6, steps=20, method="ddpm", classes=3, seed=100),
    dict(n=1, steps=50, method="ddim", eta=0.5, classes="all", guidance=1.5, seed=7),
    dict(n=5, steps=10, method="ddim", seeds=[9, 2**63, 5, 4, 3], classes=[2, 0, 1]),
    dict(n=2, steps=20, method="ddim", eta=1.0, seed=40),
    dict(n=4, steps=50, method="ddpm", classes=[1, 2], guidance=3.0, seed=11),
    dict(n=1, steps=10, method="ddpm", seed=0),
    dict(n=7, steps=20, method="ddim", classes="all", guidance=0.0, seed=500),
    dict(n=2, steps=50, method="ddim", classes=2, guidance=1.0, seed=3, spacing="trailing"),
    dict(n=3, steps=10, method="ddim", eta=0.25, classes=[0], guidance=2.5, seed=77),
    dict(n=1, steps=20, method="ddpm", classes=1, guidance=4.0, seed=2**40),
    dict(n=5, steps=10, method="ddim", seed=12),
]


@pytest.fixture
def exact_floats(monkeypatch):
    """Results as float32 x_0 (NHWC) instead of uint8, so "identical" means bit for bit, not up to rounding."""

    def floats(x, value_range=(-1.0, 1.0)):
        return np.asarray(x, dtype=np.float32).transpose(0, 2, 3, 1).copy()

    monkeypatch.setattr(parts_module, "to_uint8", floats)


@pytest.fixture(scope="module", params=["ort-cpu", "openvino"])
def cond(request, cond_model):
    return Sampler(cond_model, backend=request.param, threads=1)


@pytest.fixture(scope="module")
def cond_ort(cond_model):
    return Sampler(cond_model, backend="ort-cpu", threads=1)


def solo(sampler, params):
    return sampler.sample(**params)


def same_bits(a, b):
    return a.shape == b.shape and np.array_equal(
        np.ascontiguousarray(a).view(np.uint8), np.ascontiguousarray(b).view(np.uint8)
    )


class Gate:
    """An on_step hook that holds the worker after each step until `open()`: a frozen batcher state to test."""

    def __init__(self):
        self.event, self.stepped, self.steps = threading.Event(), threading.Event(), 0

    def __call__(self, rows, seconds):
        self.steps += 1
        self.stepped.set()
        self.event.wait(10)

    def open(self):
        self.event.set()

    def wait_first_step(self, timeout=10):
        """Block until the worker has run one step and is held; fail if it has not within `timeout` s (it died)."""
        assert self.stepped.wait(timeout), f"the batcher's worker ran no step within {timeout} s"


def test_concurrent_mixed_requests_are_bit_identical_to_solo_sampling(cond, exact_floats):
    rows = []
    batcher = StepBatcher(cond.parts, max_batch=4, on_step=lambda r, s: rows.append(r))
    futures = []
    for i, params in enumerate(MIXED):  # arrivals spread over the run: images join while others are mid-way
        futures.append(batcher.submit(cond.request(**params)))
        if i % 3 == 2:
            time.sleep(0.01)
    results = [f.result(timeout=60) for f in futures]
    batcher.close()
    for params, result in zip(MIXED, results):
        images, records = solo(cond, params)
        assert same_bits(result.images, images), params
        assert result.records == records
    one_request_at_a_time = sum(math.ceil(p["n"] / 4) * p["steps"] for p in MIXED)
    assert batcher.stats["steps"] < one_request_at_a_time  # images of different requests shared forwards
    assert max(rows) > 4  # guided images' unconditional rows rode along
    assert batcher.stats["completed"] == len(MIXED) and batcher.stats["images"] == sum(p["n"] for p in MIXED)


POLICIES = [Fifo(), ShortestRemainingFirst(), ShortestRemainingFirst(age_bound=0.005), Gang(), OneAtATime()]
POLICIES += [RequestLevel()]


@pytest.mark.parametrize("policy", POLICIES, ids=repr)
def test_every_policy_gives_each_image_its_solo_bits(cond_ort, exact_floats, policy):
    """Admission order and company change, the images do not: MIXED under each policy equals Sampler.sample."""
    batcher = StepBatcher(cond_ort.parts, max_batch=4, policy=policy)
    futures = []
    for i, params in enumerate(MIXED):
        futures.append(batcher.submit(cond_ort.request(**params)))
        if i % 3 == 2:
            time.sleep(0.01)
    results = [f.result(timeout=60) for f in futures]
    batcher.close()
    for params, result in zip(MIXED, results):
        images, records = solo(cond_ort, params)
        assert same_bits(result.images, images), (policy, params)
        assert result.records == records
    assert batcher.stats["completed"] == len(MIXED) and batcher.queued_images == batcher.active_images == 0


class Faulty:
    """A policy that names a request that is not queued, or raises."""

    def __init__(self, raises):
        self.raises = raises

    def admit(self, queue, batch):
        if self.raises:
            raise KeyError("boom")
        return Decision(((queue[-1].arrival + 1, 1),))


@pytest.mark.parametrize(
    "raises, message", [(False, "admits request 3, which is not queued"), (True, "the admission policy failed")]
)
def test_a_faulty_policy_fails_the_queued_requests_and_the_worker_goes_on(cond_ort, raises, message):
    batcher = StepBatcher(cond_ort.parts, max_batch=2, policy=Faulty(raises))
    with batcher.paused():
        futures = [batcher.submit(cond_ort.request(1, steps=2, seed=k)) for k in range(2)]
    for f in futures:
        with pytest.raises(PolicyError, match=message):
            f.result(timeout=30)
    assert batcher.worker_alive and batcher.stats["failed"] == 2 and batcher.queued_images == 0
    batcher.close()


def test_a_request_larger_than_the_batch_streams_through_it(cond_ort, exact_floats):
    batcher = StepBatcher(cond_ort.parts, max_batch=3)
    params = dict(n=10, steps=10, classes="all", guidance=2.0, seed=5)
    result = batcher.submit(cond_ort.request(**params)).result(timeout=30)
    batcher.close()
    assert same_bits(result.images, solo(cond_ort, params)[0])


def held_after_a_step(sampler, first, **options):
    """(a StepBatcher whose worker is held after the first step of request `first`, its Gate, first's future)."""
    gate = Gate()
    batcher = StepBatcher(sampler.parts, on_step=gate, **options)
    future = batcher.submit(first)
    gate.wait_first_step()
    return batcher, gate, future


def test_cancelling_frees_queue_and_batch_capacity(cond_ort):
    batcher, gate, running = held_after_a_step(
        cond_ort, cond_ort.request(2, steps=50, seed=1), max_batch=2, max_queue=4
    )
    queued = batcher.submit(cond_ort.request(4, steps=50, seed=2))
    assert (batcher.active_images, batcher.queued_images) == (2, 4)
    with pytest.raises(QueueFull):
        batcher.submit(cond_ort.request(1, steps=5, seed=3))
    assert queued.cancel() and running.cancel()
    gate.open()  # at the next step boundary the cancelled images leave the queue and the batch
    deadline = time.monotonic() + 10
    while (batcher.active_images or batcher.queued_images) and time.monotonic() < deadline:
        time.sleep(0.001)
    assert batcher.stats["steps"] <= 2 and batcher.stats["cancelled"] == 2
    result = batcher.submit(cond_ort.request(4, steps=5, seed=3)).result(timeout=30)  # the whole queue is free
    batcher.close()
    assert np.array_equal(result.images, cond_ort.sample(4, steps=5, seed=3)[0])
    for future in (running, queued):
        with pytest.raises(CancelledError):
            future.result()
    assert batcher.stats["completed"] == 1 and batcher.stats["images"] == 4


def test_a_request_past_its_timeout_fails_with_timeout_error_and_the_next_one_runs(cond_ort):
    gate, clock = Gate(), Clock()
    batcher = StepBatcher(cond_ort.parts, max_batch=4, on_step=gate, clock=clock)
    slow = batcher.submit(cond_ort.request(2, steps=50, seed=1), timeout=0.05)
    gate.wait_first_step()
    clock.advance(0.06)  # past its deadline while the worker is held after step 1
    gate.open()
    with pytest.raises(TimeoutError, match="did not finish within its timeout"):
        slow.result(timeout=30)
    ok = batcher.submit(cond_ort.request(1, steps=5, seed=4), timeout=30).result(timeout=30)
    batcher.close()
    assert np.array_equal(ok.images, cond_ort.sample(1, steps=5, seed=4)[0])
    assert (batcher.stats["timed_out"], batcher.stats["failed"], batcher.stats["completed"]) == (1, 1, 1)
    assert batcher.active_images == 0 and batcher.queued_images == 0


def test_a_full_queue_refuses_at_once_with_a_retry_hint(cond_ort):
    batcher, gate, first = held_after_a_step(cond_ort, cond_ort.request(1, steps=20, seed=0), max_batch=1, max_queue=3)
    accepted = batcher.submit(cond_ort.request(3, steps=20, seed=1))
    start = time.monotonic()
    with pytest.raises(QueueFull, match=r"holds 3 images \(limit 3\); 1 more do not fit") as refused:
        batcher.submit(cond_ort.request(1, steps=20, seed=9))
    assert time.monotonic() - start < 0.05 and refused.value.retry_after >= 1
    gate.open()
    assert len(first.result(timeout=30).images) == 1 and len(accepted.result(timeout=30).images) == 3
    batcher.close()
    assert (batcher.stats["rejected"], batcher.stats["submitted"]) == (1, 2)


def test_non_finite_images_fail_alone_while_their_batch_mates_stay_exact(nan_model, exact_floats):
    sampler = Sampler(nan_model, backend="ort-cpu", threads=1)
    batcher = StepBatcher(sampler.parts, max_batch=3)
    mixed = dict(n=5, steps=10, classes=[0, 2, 1, 3, 2], seed=20)
    clean = dict(n=4, steps=20, classes=[1, 3], guidance=2.0, seed=30)
    results = [batcher.submit(sampler.request(**p)) for p in (mixed, clean)]
    got_mixed, got_clean = (f.result(timeout=30) for f in results)
    batcher.close()
    assert [r["status"] for r in got_mixed.records] == ["ok", "error", "ok", "ok", "error"]
    assert "non-finite" in got_mixed.records[1]["error"] and np.isfinite(got_mixed.images).all()
    assert same_bits(got_mixed.images, solo(sampler, mixed)[0]) and same_bits(got_clean.images, solo(sampler, clean)[0])
    assert all(r["status"] == "ok" for r in got_clean.records)


@pytest.mark.parametrize("inline", [False, True])
def test_close_with_drain_finishes_everything_accepted_then_refuses(cond_ort, inline):
    batcher = StepBatcher(cond_ort.parts, max_batch=2, inline_output=inline)
    params = [dict(n=k, steps=10, seed=k) for k in (1, 3, 2, 4)]
    futures = [batcher.submit(cond_ort.request(**p)) for p in params]
    batcher.close(drain=True)
    assert all(f.done() for f in futures)
    for p, f in zip(params, futures):
        assert np.array_equal(f.result().images, cond_ort.sample(**p)[0])
    with pytest.raises(BatcherClosed):
        batcher.submit(cond_ort.request(1, steps=5))


def test_close_without_drain_fails_what_was_accepted(cond_ort):
    gate = Gate()
    batcher = StepBatcher(cond_ort.parts, max_batch=2, on_step=gate)
    futures = [batcher.submit(cond_ort.request(2, steps=50, seed=k)) for k in range(3)]
    gate.wait_first_step()
    closer = threading.Thread(target=batcher.close, kwargs={"drain": False})
    closer.start()
    gate.open()
    closer.join(30)
    for f in futures:
        with pytest.raises(BatcherClosed, match="closed before this request finished"):
            f.result(timeout=1)
    assert batcher.stats["failed"] == 3


def test_the_output_stage_decodes_off_the_step_loop(cond_ort, monkeypatch):
    """While a finished request's decode is held, the worker keeps stepping the others; results stay exact."""
    batcher = StepBatcher(cond_ort.parts, max_batch=4)
    assert not batcher.inline_output
    held, released, real = threading.Event(), threading.Event(), cond_ort.parts.finish
    at_hold, steps_while_held = [], []

    def finish(request, part, x, nonfinite_step):
        if request.steps == 2 and not released.is_set():
            at_hold.append(batcher.stats["steps"])
            held.set()
            assert released.wait(30)
            steps_while_held.append(batcher.stats["steps"] - at_hold[0])
        return real(request, part, x, nonfinite_step)

    def gate(evaluations, total):  # the slow request waits for the hold, so a busy machine cannot finish it first
        if evaluations == 6:
            assert held.wait(30)

    monkeypatch.setattr(cond_ort.parts, "finish", finish)
    quick, slow = dict(n=1, steps=2, seed=1), dict(n=2, steps=30, seed=2)
    first = batcher.submit(cond_ort.request(**quick))
    second = batcher.submit(cond_ort.request(**slow), on_progress=gate)
    assert held.wait(30)
    deadline = time.monotonic() + 30
    while batcher.stats["steps"] < at_hold[0] + 20 and time.monotonic() < deadline:  # the step loop runs on
        time.sleep(0.01)
    released.set()
    assert np.array_equal(first.result(30).images, real_images(cond_ort, quick))
    assert np.array_equal(second.result(30).images, real_images(cond_ort, slow))
    assert steps_while_held[0] >= 20  # the slow request's steps ran while the quick one's decode was held
    batcher.close()


def real_images(sampler, params):
    return Sampler(sampler.model.path, backend="ort-cpu", threads=1).sample(**params)[0]


@pytest.mark.parametrize("inline", [False, True])
def test_a_failing_decode_ends_only_its_request_and_the_worker_goes_on(cond_ort, monkeypatch, inline):
    batcher, real = StepBatcher(cond_ort.parts, max_batch=4, inline_output=inline), cond_ort.parts.finish

    def finish(request, part, x, nonfinite_step):
        if request.seeds[0] == 13:
            raise RuntimeError("decoder out of memory")
        return real(request, part, x, nonfinite_step)

    monkeypatch.setattr(cond_ort.parts, "finish", finish)
    failing = batcher.submit(cond_ort.request(2, steps=3, seed=13))
    fine = batcher.submit(cond_ort.request(2, steps=5, seed=14))
    with pytest.raises(RuntimeError, match="decoder out of memory"):
        failing.result(30)
    assert fine.result(30).images.shape[0] == 2 and batcher.worker_alive
    assert batcher.stats["failed"] == 1 and "decoder out of memory" in batcher.last_failure["error"]
    after = batcher.submit(cond_ort.request(1, steps=2, seed=15))
    assert after.result(30).images.shape[0] == 1
    batcher.close()


def test_trajectory_requests_are_refused(cond_ort):
    batcher = StepBatcher(cond_ort.parts)
    with pytest.raises(InvalidParameterError, match="trajectory"):
        batcher.submit(cond_ort.request(1, steps=5, trajectory=2))
    batcher.close()


@pytest.fixture(scope="module")
def text(tiny_sd):
    return Sampler(tiny_sd.model, backend="ort-cpu", threads=1)


def test_text_requests_mix_prompts_in_shared_forwards_and_stay_exact(text, exact_floats):
    requests = [
        dict(n=2, steps=6, prompt="a photo of a cat", guidance=7.5, seed=1),
        dict(n=3, steps=4, prompt=["a red shoe", "the blue bag"], negative_prompt="a dog", guidance=3.0, seed=9),
        dict(n=1, steps=6, method="ddpm", prompt="a dog", guidance=1.0, seed=4),
    ]
    batcher = StepBatcher(text.parts, max_batch=3)
    with batcher.paused():
        futures = [batcher.submit(text.request(**r)) for r in requests]
    results = [f.result(timeout=120) for f in futures]
    batcher.close()
    for params, result in zip(requests, results):
        images, records = solo(text, params)
        assert same_bits(result.images, images), params
        assert [r["prompt"] for r in result.records] == [r["prompt"] for r in records]
    assert batcher.stats["steps"] < sum(r["steps"] for r in requests)  # their images shared forwards


def _bench_serve():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "bench" / "bench_serve.py"
    spec = importlib.util.spec_from_file_location("bench_serve", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("mode, steps", [("solo", 6 + 10), ("request", 10), ("step", 10), ("srf", 10), ("gang", 10)])
def test_the_benchmark_baselines_differ_only_in_admission(cond_ort, exact_floats, mode, steps):
    """(a) runs requests one after the other, (b) batches what arrives together, (c) too; all give solo's images."""
    requests = [dict(n=2, steps=6, seed=3, classes=1, guidance=2.0), dict(n=1, steps=10, seed=8, classes=2)]
    batcher = _bench_serve().MODES[mode](cond_ort.parts, max_batch=4)
    with batcher.paused():  # both queued before the worker admits anything
        futures = [batcher.submit(cond_ort.request(**r)) for r in requests]
    results = [f.result(timeout=60) for f in futures]
    batcher.close()
    assert batcher.stats["steps"] == steps
    for params, result in zip(requests, results):
        assert same_bits(result.images, solo(cond_ort, params)[0])


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(max_batch=0), "max_batch must be >= 1, got 0"),
        (dict(max_batch=2.5), "max_batch must be an integer, got 2.5"),
        (dict(max_queue=True), "max_queue must be an integer, got True"),
    ],
)
def test_the_batcher_is_configured_like_the_api(cond_ort, options, message):
    with pytest.raises(InvalidParameterError) as err:
        StepBatcher(cond_ort.parts, **options)
    assert str(err.value) == message


def test_submit_takes_a_request_and_a_finite_timeout(cond_ort):
    batcher = StepBatcher(cond_ort.parts)
    try:
        with pytest.raises(InvalidParameterError, match=r"submit takes a Request \(Sampler.request\(...\)\), got dict"):
            batcher.submit({"n": 1})
        for timeout in (float("nan"), float("inf"), -1):
            with pytest.raises(InvalidParameterError, match="timeout must be a finite number >= 0"):
                batcher.submit(cond_ort.request(1, steps=2), timeout=timeout)
        assert batcher.stats["submitted"] == 0
    finally:
        batcher.close()
