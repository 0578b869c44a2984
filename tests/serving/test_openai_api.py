"""OpenAI's images API (engine/serving/openai_api.py) through the official `openai` client on a real server: images
bit-identical to Sampler.sample, class names as prompts, OpenAI's error shape and retry headers, streaming with
previews checked against a float64 x0 from the model's own forward, and a failing decode contained to its request."""

import base64
import io
import json
import threading

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from ddengine.runtime.sampler import Sampler
from ddengine.serving.app import Settings, create_app
from tests.serving.test_app import live_server, slow_steps
from tests.support.tiny_models import build_tiny_model

openai = pytest.importorskip("openai")
diffusers = pytest.importorskip("diffusers")

NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]


@pytest.fixture(scope="module")
def named(tmp_path_factory):
    """A tiny 10-class model whose metadata names its classes (as the shipped Fashion-MNIST model's does)."""
    path = tmp_path_factory.mktemp("openai") / "named.onnx"
    build_tiny_model(path, channels=1, num_classes=10, meta={"class_names": NAMES})
    return Sampler(path, backend="ort-cpu", threads=1)


@pytest.fixture(scope="module")
def server(named):
    app = create_app(named, Settings(max_batch=4, max_queue=8))
    with live_server(app) as url:
        yield app, url


def client(url, **options):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, **options)


def decode(b64):
    image = np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))
    return image[..., None] if image.ndim == 2 else image


def test_the_openai_client_gets_the_samplers_images_for_a_class_name(server, named):
    _, url = server
    response = client(url).images.generate(
        model="default",
        prompt="sneaker",
        n=2,
        size="8x8",
        response_format="b64_json",
        extra_body={"seed": 5, "steps": 4},
    )
    want, _ = named.sample(2, classes=7, seed=5, steps=4)
    assert np.array_equal(np.stack([decode(d.b64_json) for d in response.data]), want)
    assert response.size == "8x8" and response.output_format == "png" and response.created > 0


def test_the_engine_options_ride_in_extra_body_and_match_the_native_endpoint(server, named):
    _, url = server
    extra = {"seed": 11, "steps": 5, "method": "dpmpp-2m", "guidance": 2.0}
    response = client(url).images.generate(prompt="Ankle Boot", extra_body=extra)
    want, _ = named.sample(1, classes=9, **extra)
    assert np.array_equal(decode(response.data[0].b64_json)[None], want)


@pytest.mark.parametrize("fmt, lossless", [("webp", True), ("jpeg", False)])
def test_output_formats_decode_to_the_image(server, named, fmt, lossless):
    _, url = server
    response = client(url).images.generate(prompt="bag", output_format=fmt, extra_body={"steps": 3})
    raw = base64.b64decode(response.data[0].b64_json)
    assert Image.open(io.BytesIO(raw)).format == {"webp": "WEBP", "jpeg": "JPEG"}[fmt]
    want, _ = named.sample(1, classes=8, steps=3)
    got = decode(response.data[0].b64_json)[..., :1]  # WEBP stores grey as RGB
    assert np.array_equal(got, want[0]) if lossless else np.abs(got.astype(int) - want[0]).max() < 40


@pytest.mark.parametrize(
    "kwargs, param, message",
    [
        (dict(prompt="boot"), "prompt", "prompt must name one of this model's classes (T-shirt/top, Trouser"),
        (dict(prompt="bag", size="1024x1024"), "size", "size must be '8x8' (the size this model makes) or 'auto'"),
        (dict(prompt="bag", response_format="url"), "response_format", "response_format 'url' is not served"),
        (dict(prompt="bag", extra_body={"colour": "red"}), "colour", "unknown field 'colour'; this endpoint takes"),
        (dict(prompt="bag", extra_body={"steps": 0}), "steps", "steps must be >= 1, got 0"),
        (dict(prompt="bag", n=9), None, "n must be in [1, 8], got 9"),
        (dict(prompt="bag", partial_images=2), "partial_images", "partial_images needs stream: true"),
    ],
)
def test_bad_requests_are_openai_errors_naming_the_field(server, kwargs, param, message):
    _, url = server
    with pytest.raises(openai.BadRequestError) as err:
        client(url).images.generate(**kwargs)
    assert err.value.status_code == 400
    body = err.value.body
    assert message in body["message"] and body["type"] == "invalid_request_error" and body["param"] == param


def test_overload_is_429_with_retry_after(named):
    app = create_app(named, Settings(max_batch=1, max_queue=2))
    with live_server(app) as url:
        slow_steps(app, 0.05)
        first = threading.Thread(
            target=lambda: client(url).images.generate(prompt="bag", n=2, extra_body={"steps": 20})
        )
        first.start()
        try:
            assert wait_for_queue(app)
            with pytest.raises(openai.RateLimitError) as err:
                client(url).images.generate(prompt="bag", n=2, extra_body={"steps": 2})
            assert int(err.value.response.headers["retry-after"]) >= 1
            assert err.value.body["type"] == "rate_limit_error"
        finally:
            first.join(60)


def wait_for_queue(app, seconds=10):
    import time

    deadline = time.monotonic() + seconds
    batcher = app.state.app_state.batcher
    while time.monotonic() < deadline:
        if batcher.queued_images + batcher.active_images >= 2:
            return True
        time.sleep(0.005)
    return False


def x0_oracle(named, label, seed, steps, done):
    """uint8 of the float64 DDIM x0 prediction made in step `done` (1-based): the model's forward by onnxruntime at
    x_t (the engine's latents after step done - 2, from its callback), diffusers' timesteps and alphas_cumprod."""
    seen = {}
    named.sample(1, classes=label, seed=seed, steps=steps, callback=lambda i, t, x, first: seen.update({i: x.copy()}))
    scheduler = diffusers.DDIMScheduler.from_config(named.spec.scheduler)
    scheduler.set_timesteps(steps)
    t = int(scheduler.timesteps[done - 1])
    x_t = seen[done - 2].astype(np.float32)
    session = ort.InferenceSession(str(named.model.path), providers=["CPUExecutionProvider"])
    feeds = {"sample": x_t, "timestep": np.array([t], np.int64), "class_labels": np.array([label], np.int64)}
    eps = session.run(None, feeds)[0].astype(np.float64)
    abar = float(scheduler.alphas_cumprod[t])
    x0 = (x_t.astype(np.float64) - np.sqrt(1 - abar) * eps) / np.sqrt(abar)
    return np.rint(np.clip((x0 + 1) / 2, 0, 1) * 255).astype(np.uint8).transpose(0, 2, 3, 1)[0]


def test_streaming_sends_previews_from_the_kernels_x0_then_the_final_image(server, named):
    _, url = server
    events = list(
        client(url).images.generate(prompt="coat", stream=True, partial_images=2, extra_body={"seed": 3, "steps": 6})
    )
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    want, _ = named.sample(1, classes=4, seed=3, steps=6)
    assert np.array_equal(decode(events[-1].b64_json), want[0])  # the final image is the non-streamed one
    for event, done in zip(events[:2], (2, 4)):  # 2 previews over 6 steps: after steps 2 and 4
        got = decode(event.b64_json).astype(int)
        assert np.abs(got - x0_oracle(named, 4, 3, 6, done)).max() <= 1


def test_the_python_api_gives_the_same_previews_as_the_stream(server, named):
    _, url = server
    events = list(
        client(url).images.generate(prompt="coat", stream=True, partial_images=2, extra_body={"seed": 3, "steps": 6})
    )
    got = []
    named.sample(1, classes=4, seed=3, steps=6, previews=2, on_preview=lambda k, images, first: got.append((k, images)))
    assert [k for k, _ in got] == [0, 1]
    for (_, images), event in zip(got, events[:2]):
        assert np.array_equal(images[0], decode(event.b64_json))  # the host loop's and the batcher's previews


def test_a_failing_decode_ends_its_request_with_a_500_and_the_server_goes_on(named):
    app = create_app(named, Settings(max_batch=4, max_queue=8))
    decoder = named.parts.decoder
    real, calls = decoder.decode, []

    def fails_once(x, batch_size):
        calls.append(len(x))
        if len(calls) == 1:
            raise RuntimeError("VAE decode failed (injected)")
        return real(x, batch_size)

    with live_server(app) as url:
        decoder.decode = fails_once
        try:
            with pytest.raises(openai.InternalServerError) as err:
                client(url).images.generate(prompt="shirt", extra_body={"steps": 3})
            assert "VAE decode failed (injected)" in err.value.body["message"]
            assert err.value.response.headers["x-should-retry"] == "false"  # work had started: no retry
            again = client(url).images.generate(prompt="shirt", extra_body={"steps": 3})
            want, _ = named.sample(1, classes=6, steps=3)
            assert np.array_equal(decode(again.data[0].b64_json)[None], want)
        finally:
            decoder.decode = real
        import httpx

        assert httpx.get(f"{url}/healthz").json()["status"] == "ok"


def test_the_schema_and_docs_are_served(server):
    import httpx

    _, url = server
    schema = httpx.get(f"{url}/openapi.json").json()
    body = schema["paths"]["/v1/images/generations"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {"prompt", "size", "response_format", "stream", "partial_images", "seed", "steps"} <= set(body["properties"])
    assert body["required"] == ["prompt"]
    assert httpx.get(f"{url}/docs").status_code == 200
    assert json.loads(json.dumps(schema))  # plain JSON


def png_bytes(array, mode=None):
    buffer = io.BytesIO()
    Image.fromarray(array, mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def start_image():
    return (np.add.outer(np.arange(8), np.arange(8)) * 17).astype(np.uint8)


def test_an_edit_with_openais_alpha_mask_is_inpainting_of_the_transparent_area(server, named, start_image):
    _, url = server
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 3] = 255
    rgba[2:6, 1:5, 3] = 0  # transparent: the area to edit
    response = client(url).images.edit(
        image=("start.png", png_bytes(start_image), "image/png"),
        mask=("mask.png", png_bytes(rgba, "RGBA"), "image/png"),
        prompt="dress",
        n=2,
        extra_body={"seed": 4, "steps": 5},
    )
    white = np.where(rgba[..., 3] == 0, 255, 0).astype(np.uint8)  # our convention: white = repaint
    want, _ = named.sample(2, classes=3, seed=4, steps=5, image=start_image[:, :, None], mask=white)
    got = np.stack([decode(d.b64_json) for d in response.data])
    assert np.array_equal(got, want)
    kept = rgba[..., 3] == 255
    assert np.abs(got[:, kept, 0].astype(int) - start_image[kept]).max() <= 1  # the opaque area stays the image


def test_an_edit_without_mask_is_image_to_image_and_a_mask_needs_alpha(server, named, start_image):
    _, url = server
    response = client(url).images.edit(
        image=("start.png", png_bytes(start_image), "image/png"), prompt="7", extra_body={"steps": 10, "strength": 0.5}
    )
    want, _ = named.sample(1, classes=7, steps=10, image=start_image[:, :, None], strength=0.5)
    assert np.array_equal(decode(response.data[0].b64_json)[None], want)
    with pytest.raises(openai.BadRequestError) as err:
        client(url).images.edit(
            image=("start.png", png_bytes(start_image), "image/png"),
            mask=("mask.png", png_bytes(start_image), "image/png"),
            prompt="bag",
        )
    assert "mask must be a PNG with an alpha channel" in err.value.body["message"] and err.value.body["param"] == "mask"


def test_the_native_endpoint_streams_progress_previews_and_the_result(server, named):
    import httpx

    _, url = server
    body = {"n": 2, "steps": 6, "seed": 3, "classes": [4, 4]}
    with httpx.stream("POST", f"{url}/v1/images?stream=true&previews=2", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [
            (block.split("\n")[0].removeprefix("event: "), json.loads(block.split("\n")[1].removeprefix("data: ")))
            for block in response.read().decode().strip().split("\n\n")
        ]
    progress = [data for kind, data in events if kind == "progress"]
    assert [p["done"] for p in progress] == [2 * k for k in range(1, 7)] and {p["total"] for p in progress} == {12}
    previews = [data for kind, data in events if kind == "preview"]
    assert [p["k"] for p in previews] == [0, 1]
    got = []
    named.sample(2, classes=4, seed=3, steps=6, previews=2, on_preview=lambda k, images, first: got.append(images))
    assert np.array_equal(np.stack([decode(png) for png in previews[0]["images"]]), got[0])
    kind, result = events[-1]
    want, _ = named.sample(**body)
    assert kind == "result" and np.array_equal(np.stack([decode(i["png"]) for i in result["images"]]), want)
