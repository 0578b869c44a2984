"""Ray Serve (engine/serving/ray_serve.py) on a local 2-CPU Ray: two replicas give solo sampling's images, and a replica
killed mid-load is replaced while every request completes or gets an error response (none lost)."""

import os
import socket
import threading
import time
from collections import Counter

import httpx
import numpy as np
import pytest

ray = pytest.importorskip("ray")
from ray import serve  # noqa: E402

from ddengine.runtime.sampler import Sampler  # noqa: E402
from ddengine.serving.app import Settings  # noqa: E402
from ddengine.serving.ray_serve import DEPLOYMENT, AppArgs, build_app, deployment_options  # noqa: E402
from tests.serving.test_app import decode  # noqa: E402

pytestmark = pytest.mark.slow
APP = "ddengine"


@pytest.fixture(scope="module")
def cluster(cond_model):
    """A local Ray (2 CPUs, no dashboard, a small object store) with 2 ddengine replicas; yields (URL, handle)."""
    os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 * 1024**2, log_to_driver=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        args = {"model": str(cond_model), "backend": "ort-cpu", "threads": "1", "num_replicas": "2", "max_batch": "4"}
        handle = serve.run(build_app(args), name=APP, route_prefix="/")  # as `serve run ... key=value` passes them
        yield f"http://127.0.0.1:{port}", handle
    finally:
        serve.shutdown()
        ray.shutdown()


def replicas():
    return serve.status().applications[APP].deployments[DEPLOYMENT].replica_states


def test_two_replicas_give_the_solo_samplers_images(cluster, cond_model):
    url, handle = cluster
    assert replicas() == {"RUNNING": 2} and handle.check_health.remote().result(timeout_s=30) is None
    requests = [
        {
            "n": 1 + i % 3,
            "steps": 10 + 5 * (i % 3),
            "seed": 10 * i,
            "classes": [i % 4],
            "guidance": (None, 2.0)[i % 2],
            "method": ("ddim", "ddpm")[i % 2],
        }
        for i in range(8)
    ]
    results = [None] * len(requests)

    def post(i):
        results[i] = httpx.post(f"{url}/v1/images", json=requests[i], timeout=60)

    threads = [threading.Thread(target=post, args=(i,)) for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    sampler = Sampler(cond_model, backend="ort-cpu")
    for params, response in zip(requests, results):
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["model"] == sampler.model.sha256
        assert np.array_equal(np.stack([decode(i["png"]) for i in body["images"]]), sampler.sample(**params)[0])
    health = httpx.get(f"{url}/healthz", timeout=10).json()
    assert health["status"] == "ok" and health["batch_invariant"] is True
    assert httpx.post(f"{url}/v1/images", json={"n": True}, timeout=10).json() == {
        "error": "n must be an integer, got True"
    }


def test_a_killed_replica_is_replaced_and_no_request_is_lost(cluster):
    url, handle = cluster
    outcomes, lock, stop = [], threading.Lock(), threading.Event()

    def worker(w):
        with httpx.Client(base_url=url, timeout=60) as http:
            for j in range(40):  # bounded: at most 40 requests per worker
                if stop.is_set():
                    return
                try:
                    r = http.post("/v1/images", json={"n": 1 + j % 3, "steps": 900, "seed": 100 * w + j})
                    kind = "completed" if r.status_code == 200 and len(r.json()["images"]) == 1 + j % 3 else "error"
                    detail = r.status_code
                except httpx.TransportError as err:
                    kind, detail = "lost", repr(err)
                with lock:
                    outcomes.append((kind, detail))

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(6)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 30
    while len(outcomes) < 6 and time.monotonic() < deadline:
        time.sleep(0.02)
    victim = handle.replica_actor.remote().result(timeout_s=30)
    ray.kill(victim, no_restart=True)
    killed_at = len(outcomes)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (replicas() == {"RUNNING": 2} and len(outcomes) > killed_at + 24):
        time.sleep(0.1)
    stop.set()
    for t in threads:
        t.join(90)
    counts = Counter(kind for kind, _ in outcomes)
    errors = Counter(detail for kind, detail in outcomes if kind == "error")
    print(
        f"accepted {len(outcomes)}, completed {counts['completed']}, failed with an error {counts['error']} "
        f"{dict(errors)}, lost {counts['lost']}"
    )
    assert counts["lost"] == 0 and counts["completed"] + counts["error"] == len(outcomes)
    assert set(errors) <= {500} and counts["completed"] > killed_at  # requests kept completing after the kill
    assert replicas() == {"RUNNING": 2}
    alive = {handle.replica_actor.remote().result(timeout_s=30)._actor_id for _ in range(8)}
    assert victim._actor_id not in alive
    after = httpx.post(f"{url}/v1/images", json={"n": 2, "steps": 5}, timeout=60)
    assert after.status_code == 200 and len(after.json()["images"]) == 2


def test_serve_run_arguments_become_deployment_options():
    options = deployment_options(
        AppArgs.model_validate(
            {"max_batch": "8", "min_replicas": "1", "max_replicas": "3", "backend": "ort-cpu", "timeout": "30"}
        )
    )
    assert options["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 3, "target_ongoing_requests": 16.0}
    assert options["settings"] == Settings(max_batch=8, timeout=30.0) and options["backend"] == "ort-cpu"
    fixed = deployment_options(AppArgs.model_validate({"num_replicas": "2"}))
    assert fixed["autoscaling_config"] is None and fixed["num_replicas"] == 2
    with pytest.raises(ValueError, match="replicas"):
        AppArgs.model_validate({"replicas": 2})
