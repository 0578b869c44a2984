"""StepScheduler: concurrent requests share forwards yet every image equals solo sampling; cancel, timeout, queue
bound, NaN isolation and draining."""
import math
import threading
import time
from concurrent.futures import CancelledError

import numpy as np
import pytest

from ddengine import sampler as sampler_module
from ddengine import scheduler as scheduler_module
from ddengine.requests import InvalidParameterError
from ddengine.sampler import Sampler
from ddengine.scheduler import QueueFull, SchedulerClosed, StepScheduler
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
    monkeypatch.setattr(sampler_module, "to_uint8", floats)
    monkeypatch.setattr(scheduler_module, "to_uint8", floats)


@pytest.fixture(scope="module", params=["ort-cpu", "openvino"])
def cond(request, cond_model):
    return Sampler(cond_model, backend=request.param, threads=1)


@pytest.fixture(scope="module")
def cond_ort(cond_model):
    return Sampler(cond_model, backend="ort-cpu", threads=1)


def solo(sampler, params):
    return sampler.sample(**params)


def same_bits(a, b):
    return a.shape == b.shape and np.array_equal(np.ascontiguousarray(a).view(np.uint8), np.ascontiguousarray(b).view(np.uint8))


class Gate:
    """An on_step hook that holds the worker after each step until `open()`: a frozen scheduler state to test."""

    def __init__(self):
        self.event, self.steps = threading.Event(), 0

    def __call__(self, rows, seconds):
        self.steps += 1
        self.event.wait(10)

    def open(self):
        self.event.set()

    def wait_first_step(self):
        """Block until the worker has run one step and is held."""
        while self.steps == 0:
            time.sleep(0.001)


def test_concurrent_mixed_requests_are_bit_identical_to_solo_sampling(cond, exact_floats):
    rows = []
    scheduler = StepScheduler(cond, max_batch=4, on_step=lambda r, s: rows.append(r))
    futures = []
    for i, params in enumerate(MIXED):  # arrivals spread over the run: images join while others are mid-way
        futures.append(scheduler.submit(cond.request(**params)))
        if i % 3 == 2:
            time.sleep(0.01)
    results = [f.result(timeout=60) for f in futures]
    scheduler.close()
    for params, result in zip(MIXED, results):
        images, records = solo(cond, params)
        assert same_bits(result.images, images), params
        assert result.records == records
    one_request_at_a_time = sum(math.ceil(p["n"] / 4) * p["steps"] for p in MIXED)
    assert scheduler.stats["steps"] < one_request_at_a_time  # images of different requests shared forwards
    assert max(rows) > 4  # guided images' unconditional rows rode along
    assert scheduler.stats["completed"] == len(MIXED) and scheduler.stats["images"] == sum(p["n"] for p in MIXED)


def test_a_request_larger_than_the_batch_streams_through_it(cond_ort, exact_floats):
    scheduler = StepScheduler(cond_ort, max_batch=3)
    params = dict(n=10, steps=10, classes="all", guidance=2.0, seed=5)
    result = scheduler.submit(cond_ort.request(**params)).result(timeout=30)
    scheduler.close()
    assert same_bits(result.images, solo(cond_ort, params)[0])


def test_cancelling_frees_queue_and_batch_capacity(cond_ort):
    gate = Gate()
    scheduler = StepScheduler(cond_ort, max_batch=2, max_queue=4, on_step=gate)
    running = scheduler.submit(cond_ort.request(2, steps=50, seed=1))
    gate.wait_first_step()
    queued = scheduler.submit(cond_ort.request(4, steps=50, seed=2))
    assert (scheduler.active_images, scheduler.queued_images) == (2, 4)
    with pytest.raises(QueueFull):
        scheduler.submit(cond_ort.request(1, steps=5, seed=3))
    assert queued.cancel() and running.cancel()
    gate.open()  # at the next step boundary the cancelled images leave the queue and the batch
    deadline = time.monotonic() + 10
    while (scheduler.active_images or scheduler.queued_images) and time.monotonic() < deadline:
        time.sleep(0.001)
    assert scheduler.stats["steps"] <= 2 and scheduler.stats["cancelled"] == 2
    result = scheduler.submit(cond_ort.request(4, steps=5, seed=3)).result(timeout=30)  # the whole queue is free
    scheduler.close()
    assert np.array_equal(result.images, cond_ort.sample(4, steps=5, seed=3)[0])
    for future in (running, queued):
        with pytest.raises(CancelledError):
            future.result()
    assert scheduler.stats["completed"] == 1 and scheduler.stats["images"] == 4


def test_a_request_past_its_timeout_fails_with_timeout_error_and_the_next_one_runs(cond_ort):
    gate = Gate()
    scheduler = StepScheduler(cond_ort, max_batch=4, on_step=gate)
    slow = scheduler.submit(cond_ort.request(2, steps=50, seed=1), timeout=0.05)
    time.sleep(0.2)
    gate.open()
    with pytest.raises(TimeoutError, match="did not finish within its timeout"):
        slow.result(timeout=30)
    ok = scheduler.submit(cond_ort.request(1, steps=5, seed=4), timeout=30).result(timeout=30)
    scheduler.close()
    assert np.array_equal(ok.images, cond_ort.sample(1, steps=5, seed=4)[0])
    assert (scheduler.stats["timed_out"], scheduler.stats["failed"], scheduler.stats["completed"]) == (1, 1, 1)
    assert scheduler.active_images == 0 and scheduler.queued_images == 0


def test_a_full_queue_refuses_at_once_with_a_retry_hint(cond_ort):
    gate = Gate()
    scheduler = StepScheduler(cond_ort, max_batch=1, max_queue=3, on_step=gate)
    first = scheduler.submit(cond_ort.request(1, steps=20, seed=0))
    gate.wait_first_step()
    accepted = scheduler.submit(cond_ort.request(3, steps=20, seed=1))
    start = time.monotonic()
    with pytest.raises(QueueFull, match=r"holds 3 images \(limit 3\); 1 more do not fit") as refused:
        scheduler.submit(cond_ort.request(1, steps=20, seed=9))
    assert time.monotonic() - start < 0.05 and refused.value.retry_after >= 1
    gate.open()
    assert len(first.result(timeout=30).images) == 1 and len(accepted.result(timeout=30).images) == 3
    scheduler.close()
    assert (scheduler.stats["rejected"], scheduler.stats["submitted"]) == (1, 2)


def test_non_finite_images_fail_alone_while_their_batch_mates_stay_exact(nan_model, exact_floats):
    sampler = Sampler(nan_model, backend="ort-cpu", threads=1)
    scheduler = StepScheduler(sampler, max_batch=3)
    mixed = dict(n=5, steps=10, classes=[0, 2, 1, 3, 2], seed=20)
    clean = dict(n=4, steps=20, classes=[1, 3], guidance=2.0, seed=30)
    results = [scheduler.submit(sampler.request(**p)) for p in (mixed, clean)]
    got_mixed, got_clean = (f.result(timeout=30) for f in results)
    scheduler.close()
    assert [r["status"] for r in got_mixed.records] == ["ok", "error", "ok", "ok", "error"]
    assert "non-finite" in got_mixed.records[1]["error"] and np.isfinite(got_mixed.images).all()
    assert same_bits(got_mixed.images, solo(sampler, mixed)[0]) and same_bits(got_clean.images, solo(sampler, clean)[0])
    assert all(r["status"] == "ok" for r in got_clean.records)


def test_close_with_drain_finishes_everything_accepted_then_refuses(cond_ort):
    scheduler = StepScheduler(cond_ort, max_batch=2)
    params = [dict(n=k, steps=10, seed=k) for k in (1, 3, 2, 4)]
    futures = [scheduler.submit(cond_ort.request(**p)) for p in params]
    scheduler.close(drain=True)
    assert all(f.done() for f in futures)
    for p, f in zip(params, futures):
        assert np.array_equal(f.result().images, cond_ort.sample(**p)[0])
    with pytest.raises(SchedulerClosed):
        scheduler.submit(cond_ort.request(1, steps=5))


def test_close_without_drain_fails_what_was_accepted(cond_ort):
    gate = Gate()
    scheduler = StepScheduler(cond_ort, max_batch=2, on_step=gate)
    futures = [scheduler.submit(cond_ort.request(2, steps=50, seed=k)) for k in range(3)]
    gate.wait_first_step()
    closer = threading.Thread(target=scheduler.close, kwargs={"drain": False})
    closer.start()
    gate.open()
    closer.join(30)
    for f in futures:
        with pytest.raises(SchedulerClosed, match="closed before this request finished"):
            f.result(timeout=1)
    assert scheduler.stats["failed"] == 3


def test_trajectory_requests_are_refused(cond_ort):
    scheduler = StepScheduler(cond_ort)
    with pytest.raises(InvalidParameterError, match="trajectory"):
        scheduler.submit(cond_ort.request(1, steps=5, trajectory=2))
    scheduler.close()


@pytest.fixture(scope="module")
def text(tiny_sd):
    return Sampler(tiny_sd.model, backend="ort-cpu", threads=1)


def test_text_requests_mix_prompts_in_shared_forwards_and_stay_exact(text, exact_floats):
    requests = [dict(n=2, steps=6, prompt="a photo of a cat", guidance=7.5, seed=1),
                dict(n=3, steps=4, prompt=["a red shoe", "the blue bag"], negative_prompt="a dog", guidance=3.0, seed=9),
                dict(n=1, steps=6, method="ddpm", prompt="a dog", guidance=1.0, seed=4)]
    scheduler = StepScheduler(text, max_batch=3)
    with scheduler._cv:
        futures = [scheduler.submit(text.request(**r)) for r in requests]
    results = [f.result(timeout=120) for f in futures]
    scheduler.close()
    for params, result in zip(requests, results):
        images, records = solo(text, params)
        assert same_bits(result.images, images), params
        assert [r["prompt"] for r in result.records] == [r["prompt"] for r in records]
    assert scheduler.stats["steps"] < sum(r["steps"] for r in requests)  # their images shared forwards


def _bench_serve():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "bench" / "bench_serve.py"
    spec = importlib.util.spec_from_file_location("bench_serve", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("mode, steps", [("solo", 6 + 10), ("request", 10), ("step", 10)])
def test_the_benchmark_baselines_differ_only_in_admission(cond_ort, exact_floats, mode, steps):
    """(a) runs requests one after the other, (b) batches what arrives together, (c) too; all give solo's images."""
    requests = [dict(n=2, steps=6, seed=3, classes=1, guidance=2.0), dict(n=1, steps=10, seed=8, classes=2)]
    scheduler = _bench_serve().MODES[mode](cond_ort, max_batch=4)
    with scheduler._cv:  # both queued before the worker admits anything (the condition's lock is reentrant)
        futures = [scheduler.submit(cond_ort.request(**r)) for r in requests]
    results = [f.result(timeout=60) for f in futures]
    scheduler.close()
    assert scheduler.stats["steps"] == steps
    for params, result in zip(requests, results):
        assert same_bits(result.images, solo(cond_ort, params)[0])
