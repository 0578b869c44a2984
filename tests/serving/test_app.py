"""The HTTP API (engine/serving/app.py): images equal to solo sampling, every status code and its message, metrics,
client disconnects cancelling their images, and the connection bound (the last two on a real uvicorn server)."""

import asyncio
import base64
import io
import json
import socket
import threading
import time
from contextlib import contextmanager
from functools import partial

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from ddengine.runtime.sampler import Sampler
from ddengine.serving.app import Settings, create_app
from ddengine.serving.batcher import StepBatcher
from tests.support.clock import Clock
from tests.support.tiny_pipeline import tiny_sd  # noqa: F401  (fixture)


@pytest.fixture(scope="module")
def cond(cond_model):
    return Sampler(cond_model, backend="ort-cpu", threads=1)


@pytest.fixture
def client(cond):
    with TestClient(create_app(cond, Settings(max_batch=4, max_queue=16))) as c:
        yield c


def decode(png):
    image = np.asarray(Image.open(io.BytesIO(base64.b64decode(png))))
    return image[..., None] if image.ndim == 2 else image


def slow_steps(app, seconds=0.005):
    """Make every batcher step take at least `seconds` (requests stay in flight long enough to observe)."""
    app.state.app_state.batcher.on_step = lambda rows, s: time.sleep(seconds)


def metric(text, name, labels=None):
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and (labels is None or all(sample.labels.get(k) == v for k, v in labels.items())):
                return sample.value
    raise KeyError(name)


def test_images_are_the_solo_samplers_and_the_body_carries_the_records(client, cond):
    params = {"n": 3, "steps": 6, "method": "ddpm", "seed": 41, "classes": [2, 0], "guidance": 2.5}
    response = client.post("/v1/images", json=params)
    assert response.status_code == 200, response.text
    body = response.json()
    images, records = cond.sample(**params)
    assert {
        k: body[k] for k in ("model", "steps", "method", "eta", "guidance", "spacing", "backend", "precision", "n")
    } == {
        "model": cond.model.sha256,
        "steps": 6,
        "method": "ddpm",
        "eta": 0.0,
        "guidance": 2.5,
        "spacing": None,
        "backend": "ort-cpu",
        "precision": "fp32",
        "n": 3,
    }
    assert [(i["index"], i["seed"], i["class"], i["status"], i["error"]) for i in body["images"]] == [
        (r["index"], r["seed"], r["class"], r["status"], r["error"]) for r in records
    ]
    assert np.array_equal(np.stack([decode(i["png"]) for i in body["images"]]), images)


def test_a_request_with_classes_and_no_guidance_gets_the_models_recommended_guidance(tmp_path):
    from tests.support.tiny_models import build_tiny_model

    build_tiny_model(tmp_path / "g.onnx", channels=3, num_classes=4, recommended_guidance=3.0)
    sampler = Sampler(tmp_path / "g.onnx", backend="ort-cpu", threads=1)
    with TestClient(create_app(sampler, Settings(max_batch=4, max_queue=16))) as http:
        implicit = http.post("/v1/images", json={"n": 2, "steps": 4, "seed": 3, "classes": [1, 2]}).json()
        unguided = http.post(
            "/v1/images", json={"n": 2, "steps": 4, "seed": 3, "classes": [1, 2], "guidance": 1}
        ).json()
    explicit, _ = sampler.sample(2, steps=4, seed=3, classes=[1, 2], guidance=3.0)
    assert implicit["guidance"] == 3.0 and unguided["guidance"] == 1.0
    assert np.array_equal(np.stack([decode(i["png"]) for i in implicit["images"]]), explicit)
    assert not np.array_equal(np.stack([decode(i["png"]) for i in unguided["images"]]), explicit)


def test_concurrent_http_requests_share_batches_and_stay_exact(cond):
    requests = [
        {"n": 3, "steps": 10, "seed": 1, "classes": 1, "guidance": 2.0},
        {"n": 2, "steps": 20, "method": "ddpm", "seeds": [7, 2**64 - 1], "classes": "all"},
        {"n": 1, "steps": 10, "eta": 0.5, "classes": [3]},
        {"n": 4, "steps": 5, "seed": 9, "classes": [0, 1], "spacing": "trailing"},
    ]
    app = create_app(cond, Settings(max_batch=2, max_queue=64))
    with live_server(app) as url:
        slow_steps(app, 0.005)  # all four arrive while the first is still running

        async def all_at_once():
            async with httpx.AsyncClient(base_url=url, timeout=60) as http:
                return await asyncio.gather(*(http.post("/v1/images", json=r) for r in requests))

        responses = asyncio.run(all_at_once())
    for params, response in zip(requests, responses):
        assert response.status_code == 200, response.text
        assert np.array_equal(np.stack([decode(i["png"]) for i in response.json()["images"]]), cond.sample(**params)[0])
    assert app.state.app_state.batcher.stats["steps"] < 2 * 10 + 20 + 10 + 2 * 5  # fewer than one request at a time


@pytest.mark.parametrize(
    "body, message",
    [
        ('{"n": 2', "the body must be a JSON object: Expecting ',' delimiter: line 1 column 8 (char 7)"),
        ("", "the body must be a JSON object: Expecting value: line 1 column 1 (char 0)"),
        ("[1, 2]", "the body must be a JSON object, got list"),
        ('{"n": true}', "n must be an integer, got True"),  # the Python API's messages: values as Python writes them
        ('{"n": "2"}', "n must be an integer, got '2'"),
        ('{"steps": 2.5}', "steps must be an integer, got 2.5"),
        ('{"eta": "0.5"}', "eta must be a finite number >= 0, got '0.5'"),
        ('{"guidance": false, "classes": 1}', "guidance must be a finite number >= 0, got False"),
        ('{"classes": "some"}', "classes must be an int, a non-empty list of ints or 'all', got 'some'"),
        ('{"seeds": [1, null]}', "each seed must be an integer, got None"),
        (
            '{"n": 1, "batch_size": 4}',
            "unknown field 'batch_size' (expected some of: n, steps, method, eta, seed, seeds, "
            "classes, guidance, spacing, prompt, negative_prompt, image, strength, mask, latents)",
        ),
        ('{"n": 0}', "n must be in [1, 10000000], got 0"),
        ('{"n": -5}', "n must be in [1, 10000000], got -5"),
        ('{"n": 100000000000000000000000}', "n must be in [1, 10000000], got 100000000000000000000000"),
        ('{"n": 17}', "n must be in [1, 16], got 17"),  # the server's queue bound
        ('{"steps": 1001}', "steps must be in [1, 1000], got 1001"),
        ('{"seed": -1}', "seed must be in [0, 18446744073709551615], got -1"),
        (
            '{"seeds": [18446744073709551616]}',
            "each seed must be in [0, 18446744073709551615], got 18446744073709551616",
        ),
        ('{"eta": -0.5}', "eta must be a finite number >= 0, got -0.5"),
        ('{"eta": 1e999}', "eta must be a finite number >= 0, got inf"),
        (
            '{"method": "dpm"}',
            "method must be one of 'ddim', 'ddpm', 'dpmpp-2m', 'dpmpp-3m', 'unipc', 'euler', 'euler-a', 'plms', got 'dpm'",
        ),
        ('{"method": "ddpm", "eta": 1.0}', "eta applies to method 'ddim' only; got eta=1.0 with method 'ddpm'"),
        ('{"classes": 7}', "class must be in [0, 3], got 7"),
        ('{"guidance": 2.0}', "guidance=2.0 needs classes (it steers towards them)"),
        ('{"n": 2, "seeds": [1]}', "seeds must have n = 2 entries, got 1"),
    ],
)
def test_bad_bodies_get_422_with_one_message(client, body, message):
    response = client.post("/v1/images", content=body, headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert response.json() == {"error": message}


def test_several_bad_fields_are_named_in_one_message(client):
    response = client.post("/v1/images", json={"n": "x", "steps": "many", "colour": 1})
    assert response.status_code == 422
    error = response.json()["error"]
    assert "n must be an integer, got 'x'" in error and "steps must be an integer, got 'many'" in error
    assert "unknown field 'colour'" in error


def test_a_body_over_the_limit_gets_413_by_length_and_when_streamed(cond):
    with TestClient(create_app(cond, Settings(max_body_bytes=100))) as client:
        big = json.dumps({"n": 1, "seeds": [1] * 60}).encode()
        response = client.post("/v1/images", content=big)
        assert response.status_code == 413 and response.json() == {
            "error": f"the body is {len(big)} bytes; this server takes at most 100"
        }
        streamed = client.post("/v1/images", content=iter([big[:60], big[60:]]))  # chunked: no Content-Length
        assert streamed.status_code == 413 and streamed.json() == {
            "error": "the body is over 100 bytes, the most this server takes"
        }
        assert client.post("/v1/images", json={"n": 1, "steps": 2}).status_code == 200


def test_a_full_queue_gets_503_with_retry_after(cond):
    app = create_app(cond, Settings(max_batch=1, max_queue=2))
    with TestClient(app) as client:
        batcher, held = app.state.app_state.batcher, threading.Event()
        batcher.on_step = lambda rows, s: held.wait(10)
        try:
            running = batcher.submit(cond.request(1, steps=50))
            assert wait_until(lambda: batcher.active_images == 1)
            queued = batcher.submit(cond.request(2, steps=50))
            start = time.monotonic()
            response = client.post("/v1/images", json={"n": 1, "steps": 5})
            assert time.monotonic() - start < 2
            assert response.status_code == 503 and int(response.headers["retry-after"]) >= 1
            assert response.json() == {"error": "the queue holds 2 images (limit 2); 1 more do not fit"}
            assert client.post("/v1/images", json={"n": 3, "steps": 5}).json() == {
                "error": "n must be in [1, 2], got 3"
            }
            queued.cancel(), running.cancel()
        finally:
            held.set()
        assert client.post("/v1/images", json={"n": 2, "steps": 5}).status_code == 200
        assert metric(client.get("/metrics").text, "ddengine_requests_total", {"outcome": "rejected"}) == 1


def test_a_request_past_the_timeout_gets_504_and_its_images_leave(cond):
    clock = Clock()
    app = create_app(cond, Settings(max_batch=4, timeout=0.2), batcher_class=partial(StepBatcher, clock=clock))
    with TestClient(app) as client:
        app.state.app_state.batcher.on_step = lambda rows, s: clock.advance(0.1)  # every step takes 0.1 s of its clock
        response = client.post("/v1/images", json={"n": 2, "steps": 500})
        assert response.status_code == 504
        assert response.json() == {"error": "the request did not finish within its timeout (0.2 s)"}
        assert app.state.app_state.batcher.stats["steps"] <= 4  # it left the batch at the first step past 0.2 s
        app.state.app_state.batcher.on_step = None
        assert client.post("/v1/images", json={"n": 1, "steps": 5}).status_code == 200
        assert app.state.app_state.batcher.stats["timed_out"] == 1 and app.state.app_state.batcher.active_images == 0


def test_non_finite_images_are_errors_in_a_200_and_the_rest_are_exact(nan_model):
    sampler = Sampler(nan_model, backend="ort-cpu", threads=1)
    with TestClient(create_app(sampler)) as client:
        response = client.post("/v1/images", json={"n": 3, "steps": 8, "classes": [0, 2, 3], "seed": 5})
    body = response.json()
    assert response.status_code == 200 and [i["status"] for i in body["images"]] == ["ok", "error", "ok"]
    assert body["images"][1]["png"] is None and "non-finite" in body["images"][1]["error"]
    solo, _ = sampler.sample(3, steps=8, classes=[0, 2, 3], seed=5)
    assert np.array_equal(decode(body["images"][2]["png"]), solo[2])


def test_healthz_is_503_while_loading_then_200_then_503_while_draining(cond):
    release = threading.Event()

    def load():  # the app owns (and at shutdown closes) what its loader opens
        release.wait(10)
        return Sampler(cond.model, backend="ort-cpu", threads=1)

    app = create_app(load, background_load=True)
    with TestClient(app) as client:
        assert client.get("/healthz").status_code == 503 and client.get("/healthz").json() == {"status": "loading"}
        refused = client.post("/v1/images", json={"n": 1, "steps": 2})
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert refused.json() == {"error": "the model is still loading"}
        release.set()
        deadline = time.monotonic() + 10
        while client.get("/healthz").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert client.get("/healthz").json() == {
            "status": "ok",
            "worker_alive": True,
            "restarts": 0,
            "last_failure": None,
            "model": cond.model.sha256,
            "backend": "ort-cpu",
            "precision": "fp32",
            "batch_invariant": True,
            "max_batch": 16,
            "max_queue": 1024,
        }
        app.state.app_state.begin_drain()
        assert client.get("/healthz").status_code == 503 and client.get("/healthz").json() == {"status": "draining"}
        assert client.post("/v1/images", json={"n": 1, "steps": 2}).json() == {
            "error": "the server is shutting down and takes no new requests"
        }


def test_a_model_that_fails_to_load_is_reported_by_healthz(tmp_path):
    def load():
        return Sampler(tmp_path / "missing.onnx", backend="ort-cpu")

    with TestClient(create_app(load, background_load=True)) as client:
        deadline = time.monotonic() + 10
        while client.get("/healthz").json()["status"] == "loading" and time.monotonic() < deadline:
            time.sleep(0.01)
        health = client.get("/healthz")
        assert health.status_code == 503 and health.json()["status"] == "failed"
        assert "missing.onnx" in health.json()["error"]
        assert client.post("/v1/images", json={"n": 1}).status_code == 503


def test_metrics_count_what_was_served(cond):
    app = create_app(cond, Settings(max_batch=4))
    other = create_app(cond)  # a second app in the same process: its own registry, no clash
    with TestClient(app) as client, TestClient(other) as client2:
        for n in (1, 3):
            assert client.post("/v1/images", json={"n": n, "steps": 4}).status_code == 200
        assert client.post("/v1/images", json={"n": 0}).status_code == 422
        text = client.get("/metrics").text
        assert client2.get("/metrics").status_code == 200
    steps = app.state.app_state.batcher.stats["steps"]
    assert metric(text, "ddengine_images_completed_total") == 4
    assert metric(text, "ddengine_requests_total", {"outcome": "completed"}) == 2
    assert metric(text, "ddengine_steps_total") == steps and metric(text, "ddengine_step_seconds_count") == steps
    assert metric(text, "ddengine_request_seconds_count", {"code": "200"}) == 2
    assert metric(text, "ddengine_request_seconds_count", {"code": "422"}) == 1
    assert metric(text, "ddengine_queued_images") == 0 and metric(text, "ddengine_active_images") == 0
    assert metric(text, "ddengine_batch_occupancy") == 0 and metric(text, "ddengine_ready") == 1


def test_unknown_routes_and_methods_answer_json_errors(client):
    assert client.get("/nope").status_code == 404 and client.get("/nope").json() == {"error": "Not Found"}
    assert client.get("/v1/images").status_code == 405 and client.get("/v1/images").json() == {
        "error": "Method Not Allowed"
    }


@contextmanager
def live_server(app, **config):
    """A real uvicorn server for `app` on a free loopback port, in a thread; yields its URL."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, **{"log_level": "error", **config}))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline and thread.is_alive():
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def wait_until(condition, seconds=10):
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)
    return condition()


def test_a_client_that_disconnects_has_its_images_cancelled(cond):
    app = create_app(cond, Settings(max_batch=4))
    with live_server(app) as url:
        batcher = app.state.app_state.batcher
        slow_steps(app, 0.01)
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/images", json={"n": 3, "steps": 900}, timeout=httpx.Timeout(10, read=0.5))
        assert wait_until(lambda: batcher.stats["cancelled"] == 1)
        assert batcher.active_images == 0 and batcher.queued_images == 0
        assert batcher.stats["steps"] < 300  # it left long before its 900 steps
        slow_steps(app, 0)
        later = httpx.post(f"{url}/v1/images", json={"n": 2, "steps": 5}, timeout=30)
        assert later.status_code == 200 and len(later.json()["images"]) == 2
        assert batcher.stats["completed"] == 1


def test_concurrent_connections_are_bounded(cond):
    app = create_app(cond, Settings(max_batch=64))
    with live_server(app, limit_concurrency=4) as url:
        slow_steps(app, 0.01)

        async def burst():
            limits = httpx.Limits(max_connections=None, max_keepalive_connections=0)
            async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as http:
                return await asyncio.gather(
                    *(http.post("/v1/images", json={"n": 1, "steps": 40, "seed": i}) for i in range(12))
                )

        codes = [r.status_code for r in asyncio.run(burst())]
        slow_steps(app, 0)
        after = httpx.post(f"{url}/v1/images", json={"n": 1, "steps": 4}, timeout=30)
    assert set(codes) <= {200, 503} and codes.count(200) <= 4 and codes.count(503) >= 8, codes  # uvicorn: 503 past 4
    assert app.state.app_state.batcher.stats["submitted"] == codes.count(200) + 1
    assert after.status_code == 200


def test_text_models_take_prompts_and_class_models_refuse_them(tiny_sd, client):
    text = Sampler(tiny_sd.model, backend="ort-cpu", threads=1)
    params = {"n": 3, "steps": 4, "seed": 5, "prompt": ["a photo of a cat", "a red shoe"], "negative_prompt": "a dog"}
    with TestClient(create_app(text, Settings(max_batch=2))) as http:
        response = http.post("/v1/images", json=params)
    assert response.status_code == 200, response.text
    body = response.json()
    images, records = text.sample(**params)
    assert [(i["prompt"], i["negative_prompt"]) for i in body["images"]] == [
        (r["prompt"], r["negative_prompt"]) for r in records
    ]
    assert np.array_equal(np.stack([decode(i["png"]) for i in body["images"]]), images)
    refused = client.post("/v1/images", json={"n": 1, "prompt": "a cat"})
    assert (
        refused.status_code == 422
        and "prompt and negative_prompt need a text-to-image MODEL_DIR" in refused.json()["error"]
    )
