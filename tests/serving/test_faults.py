"""Faults stay with the requests they touch: a stuck step is given up by the watchdog (its requests fail, the queue
is kept, a new worker serves on), and /healthz reports the worker, the restarts and the last failure."""

import threading
import time

import numpy as np
import pytest
from fastapi.testclient import TestClient

from ddengine.runtime.sampler import Sampler
from ddengine.serving.app import Settings, create_app
from ddengine.serving.batcher import StepBatcher, StepStuck
from tests.support.tiny_models import build_tiny_model


@pytest.fixture
def sampler(tmp_path):
    build_tiny_model(tmp_path / "m.onnx", channels=1, num_classes=3)
    return Sampler(tmp_path / "m.onnx", backend="ort-cpu", threads=1)


def blocking_first_run(backend):
    """Make the backend's first run block until the returned event is set (a hung forward)."""
    release, real, calls = threading.Event(), backend.run, []

    def run(feeds, out):
        calls.append(1)
        if len(calls) == 1:
            release.wait(30)
        return real(feeds, out)

    backend.run = run
    return release


def test_a_stuck_step_fails_its_request_and_a_new_worker_serves_the_queue(sampler):
    release = blocking_first_run(sampler.parts.backend)
    batcher = StepBatcher(sampler.parts, max_batch=2, max_queue=8, step_timeout=0.3)
    try:
        stuck = batcher.submit(sampler.request(2, steps=3, seed=1, classes=0))
        deadline = time.monotonic() + 5
        while batcher._step_started is None and time.monotonic() < deadline:
            time.sleep(0.01)
        waiting = batcher.submit(sampler.request(1, steps=3, seed=9, classes=2))  # queued behind the stuck step
        with pytest.raises(StepStuck, match="ran past the watchdog's 0.3 s; the core was restarted"):
            stuck.result(10)
        got = waiting.result(10)
        want, _ = sampler.sample(1, steps=3, seed=9, classes=2)
        assert np.array_equal(got.images, want)
        assert batcher.restarts == 1 and batcher.worker_alive
        assert "StepStuck" in batcher.last_failure["error"]
    finally:
        release.set()
        batcher.close()


def test_healthz_reports_the_last_failure_and_the_next_request_is_served(sampler):
    backend, real = sampler.parts.backend, sampler.parts.backend.run
    fail = [True]

    def run(feeds, out):
        if fail[0]:
            fail[0] = False
            raise RuntimeError("forward failed (injected)")
        return real(feeds, out)

    with TestClient(create_app(sampler, Settings(max_batch=4, max_queue=8))) as http:
        backend.run = run  # after the startup probe
        first = http.post("/v1/images", json={"n": 1, "steps": 3, "classes": 1})
        assert first.status_code == 500 and "forward failed (injected)" in first.json()["error"]
        second = http.post("/v1/images", json={"n": 1, "steps": 3, "classes": 1})
        assert second.status_code == 200
        health = http.get("/healthz").json()
    assert health["status"] == "ok" and health["worker_alive"] and health["restarts"] == 0
    assert health["last_failure"]["error"] == "RuntimeError: forward failed (injected)"


def test_a_request_whose_admission_fails_fails_alone(sampler, monkeypatch):
    from ddengine.runtime.batch import ImageBatch

    real, calls = ImageBatch.admit, []

    def admit(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("admission failed (injected)")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ImageBatch, "admit", admit)
    batcher = StepBatcher(sampler.parts, max_batch=2, max_queue=8)
    try:
        with pytest.raises(RuntimeError, match="admission failed"):
            batcher.submit(sampler.request(1, steps=3, classes=0)).result(10)
        got = batcher.submit(sampler.request(1, steps=3, seed=5, classes=1)).result(10)
        want, _ = sampler.sample(1, steps=3, seed=5, classes=1)
        assert np.array_equal(got.images, want) and batcher.worker_alive
    finally:
        batcher.close()


def test_a_fault_in_the_workers_own_output_stage_restarts_the_core_instead_of_killing_it(sampler, monkeypatch):
    batcher = StepBatcher(sampler.parts, max_batch=2, max_queue=8)
    monkeypatch.setattr(batcher, "_progress", lambda batch: 1 / 0)  # a bug of the worker's, not of a request
    try:
        with pytest.raises(RuntimeError, match="the step failed .ZeroDivisionError"):
            batcher.submit(sampler.request(1, steps=3, classes=0)).result(10)
        monkeypatch.undo()
        got = batcher.submit(sampler.request(1, steps=3, seed=2, classes=1)).result(10)
        want, _ = sampler.sample(1, steps=3, seed=2, classes=1)
        assert np.array_equal(got.images, want) and batcher.restarts == 1 and batcher.worker_alive
    finally:
        batcher.close()
