"""Image-to-image and caller latents end to end on a foreign diffusers UNet2DModel, the ort-cpu path against
diffusers' own img2img loop (the oracle): the method's scheduler, diffusers' get_timesteps and set_begin_index, the
image noised by the scheduler's add_noise with the engine's initial normals (or the caller's latents), the torch
U-Net. At most 1 uint8 level apart; served through the StepBatcher alongside other requests, bit-identical."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from diffusers.schedulers import scheduling_ddpm, scheduling_euler_ancestral_discrete  # noqa: E402

from ddengine.core.plan import METHODS  # noqa: E402
from ddengine.core.solvers.classes import METHOD_CLASSES  # noqa: E402
from ddengine.export.diffusers_export import export_diffusers  # noqa: E402
from ddengine.runtime.params import InvalidParameterError  # noqa: E402
from ddengine.runtime.sampler import Sampler, to_uint8  # noqa: E402
from ddengine.serving.batcher import StepBatcher  # noqa: E402
from tests.export.test_export_diffusers import SCHEDULER, save_tiny  # noqa: E402
from tests.support.kernel_oracle import batch_noise  # noqa: E402

SEEDS = [5, 2**33 + 1]
CLASSES = [2, 0]
STEPS = 10


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("unet2d_img2img")
    unet = save_tiny(folder)
    export_diffusers(folder, folder / "m.onnx")
    return unet.eval(), folder / "m.onnx"


@pytest.fixture(scope="module")
def image():
    """A uint8 8x8 grey picture (a diagonal ramp)."""
    ramp = np.add.outer(np.arange(8), np.arange(8)) * 255 // 14
    return ramp.astype(np.uint8)[:, :, None]


def diffusers_loop(unet, method, monkeypatch, image=None, strength=None, latents=None, mask=None):
    """uint8 images of diffusers' img2img loop (image given), its inpainting loop (and a mask: StableDiffusion-
    InpaintPipeline's for 4-channel U-Nets) or its text-to-image loop from `latents`."""
    name, keys = METHOD_CLASSES[method]
    clips = method in ("ddim", "ddpm")  # the model's clip_sample: the solver classes do not clip
    config = {k: v for k, v in SCHEDULER.items() if k != "_class_name" and (clips or k != "clip_sample")}
    sched = getattr(diffusers, name)(**config, **keys)
    draws = iter(range(1, 10**6))
    noise = lambda shape, **kw: torch.from_numpy(batch_noise(SEEDS, shape, next(draws) - 1, 0).astype(np.float32))  # noqa: E731
    for module in (scheduling_ddpm, scheduling_euler_ancestral_discrete):
        monkeypatch.setattr(module, "randn_tensor", noise)
    sched.set_timesteps(STEPS)
    shape = (len(SEEDS), 1, 8, 8)
    z = torch.from_numpy(batch_noise(SEEDS, shape, 0, 1).astype(np.float32) if latents is None else latents)
    timesteps = sched.timesteps
    if image is None:
        x = z * sched.init_noise_sigma
    else:
        start = max(STEPS - min(int(STEPS * strength), STEPS), 0)
        timesteps = timesteps[start * sched.order :]
        if hasattr(sched, "set_begin_index"):
            sched.set_begin_index(start * sched.order)
        x0 = torch.from_numpy(image.astype(np.float32) / 127.5 - 1.0).permute(2, 0, 1)[None].expand(shape)
        x = z * sched.init_noise_sigma if mask is not None and strength == 1 else sched.add_noise(x0, z, timesteps[:1])
    labels = torch.tensor(CLASSES)
    m = (
        None
        if mask is None
        else torch.from_numpy((mask.astype(np.float32) / 255 >= 0.5).astype(np.float32))[None, None]
    )
    with torch.no_grad():
        for i, t in enumerate(timesteps):
            out = unet(sched.scale_model_input(x, t), t, class_labels=labels).sample
            x = sched.step(out, t, x).prev_sample
            if m is not None:  # the pipeline's blend: the known region at the next step's noise level
                known = x0 if i == len(timesteps) - 1 else sched.add_noise(x0, z, timesteps[i + 1 : i + 2])
                x = (1 - m) * known + m * x
    return to_uint8(x.numpy())


@pytest.mark.parametrize("method", METHODS)
def test_img2img_matches_diffusers_img2img_loop(model, image, method, monkeypatch):
    unet, path = model
    with Sampler(path, backend="ort-cpu") as sampler:
        ours, records = sampler.sample(
            2, steps=STEPS, method=method, seeds=SEEDS, classes=CLASSES, image=image, strength=0.6, guidance=1.0
        )
    assert all(r["strength"] == 0.6 and r["status"] == "ok" for r in records)
    want = diffusers_loop(unet, method, monkeypatch, image=image, strength=0.6)
    assert np.abs(ours.astype(int) - want.astype(int)).max() <= 1


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("strength", [1.0, 0.7])
def test_inpainting_matches_diffusers_inpaint_loop(model, image, method, strength, monkeypatch):
    unet, path = model
    mask = np.zeros((8, 8), np.uint8)
    mask[2:6, 1:5] = 255  # repaint a block, keep the rest
    with Sampler(path, backend="ort-cpu") as sampler:
        kwargs = dict(steps=STEPS, method=method, seeds=SEEDS, classes=CLASSES, guidance=1.0)
        ours, records = sampler.sample(2, image=image, mask=mask, strength=strength, **kwargs)
    assert all(r["inpainting"] for r in records)
    want = diffusers_loop(unet, method, monkeypatch, image=image, strength=strength, mask=mask)
    # PLMS amplifies float32 rounding the most (PNDMScheduler's sqrt(abar_prev / abar_t) scaling, see
    # tests/core/test_solvers.py): one value in 128 lands 2 levels off there
    assert np.abs(ours.astype(int) - want.astype(int)).max() <= (2 if method == "plms" else 1)
    kept = mask == 0
    assert np.abs(ours[:, kept].astype(int) - image[kept].astype(int)).max() <= 1  # the kept pixels are the image's


@pytest.mark.parametrize("method", ["ddim", "dpmpp-2m", "euler"])
def test_latents_replace_the_seeds_noise_as_diffusers_latents(model, method, monkeypatch):
    unet, path = model
    latents = np.random.default_rng(1).standard_normal((2, 1, 8, 8)).astype(np.float32)
    with Sampler(path, backend="ort-cpu") as sampler:
        ours, _ = sampler.sample(
            2, steps=STEPS, method=method, seeds=SEEDS, classes=CLASSES, latents=latents, guidance=1.0
        )
    want = diffusers_loop(unet, method, monkeypatch, latents=latents)
    assert np.abs(ours.astype(int) - want.astype(int)).max() <= 1


def test_img2img_and_inpainting_requests_in_the_batcher_equal_solo_sampling(model, image):
    _, path = model
    with Sampler(path, backend="ort-cpu") as sampler:
        mask = np.zeros((8, 8), np.uint8)
        mask[:, :4] = 255
        requests = [
            dict(n=2, steps=7, method="unipc", seed=8, classes=3, image=image, mask=mask, guidance=1.0),
            dict(n=3, steps=8, method="dpmpp-2m", seed=3, classes=1, image=image, strength=0.5, guidance=1.0),
            dict(n=2, steps=6, method="ddim", seed=9, classes=[0, 3], guidance=1.0),
            dict(n=1, steps=10, method="euler-a", seed=4, classes=2, image=image, strength=0.9, guidance=1.0),
        ]
        batcher = StepBatcher(sampler.parts, max_batch=2, max_queue=16)
        try:
            with batcher.paused():
                futures = [batcher.submit(sampler.request(**r, batch_size=2)) for r in requests]
            for future, r in zip(futures, requests):
                want, _ = sampler.sample(**r)
                assert np.array_equal(future.result(60).images, want)
        finally:
            batcher.close()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(strength=0.5), "strength=0.5 needs an image"),
        (dict(image="image", strength=0), "strength must be in (0, 1], got 0"),
        (dict(image="image", strength=0.05), "strength 0.05 runs none of the 10 steps"),
        (dict(image=np.zeros((4, 4, 1), np.uint8)), "image must be 8x8 (W x H, the size this model makes), got 4x4"),
        (dict(image=np.zeros((8, 8, 1), np.float32)), "image must be a uint8 (H, W, C)"),
        (
            dict(image="bm90IGFuIGltYWdl"),
            "image bytes are not a readable PNG or JPEG file (12 bytes in no known format)",
        ),
        (dict(latents=np.zeros((3, 1, 8, 8))), "latents must be a float array of shape (1, 1, 8, 8)"),
        (dict(latents=np.full((1, 1, 8, 8), np.nan)), "latents must be finite numbers"),
    ],
)
def test_bad_starts_are_refused_naming_what_was_given(model, image, kwargs, message):
    _, path = model
    if isinstance(kwargs.get("image"), str) and kwargs["image"] == "image":
        kwargs["image"] = image
    with Sampler(path, backend="ort-cpu") as sampler, pytest.raises(InvalidParameterError) as err:
        sampler.request(1, steps=STEPS, classes=0, **kwargs)
    assert message in str(err.value)


def test_the_native_http_endpoint_takes_a_base64_image(model, image):
    import base64

    from fastapi.testclient import TestClient

    from ddengine.runtime.output import encode_png
    from ddengine.serving.app import Settings, create_app
    from tests.serving.test_app import decode

    _, path = model
    body = {"n": 2, "steps": 8, "seed": 2, "classes": 1, "strength": 0.7, "guidance": 1.0}
    body["image"] = base64.b64encode(encode_png(image)).decode()
    with Sampler(path, backend="ort-cpu") as sampler:
        want, _ = sampler.sample(image=image, **{k: v for k, v in body.items() if k != "image"})
        with TestClient(create_app(sampler, Settings(max_batch=4, max_queue=8))) as http:
            response = http.post("/v1/images", json=body)
    assert response.status_code == 200, response.text
    assert np.array_equal(np.stack([decode(i["png"]) for i in response.json()["images"]]), want)


def test_an_rgb_image_and_mask_on_a_grey_model_convert_as_pillows_luma(model):
    from PIL import Image

    _, path = model
    rgb = np.random.default_rng(3).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    grey = np.asarray(Image.fromarray(rgb).convert("L"))[:, :, None]  # the oracle: Pillow's own conversion
    mask = np.zeros((8, 8, 3), np.uint8)
    mask[:4] = (255, 200, 30)  # a coloured mask: its luma (>= 50%) marks the repainted rows
    with Sampler(path, backend="ort-cpu") as sampler:
        kwargs = dict(steps=6, seed=1, classes=1, guidance=1.0)
        assert np.array_equal(sampler.sample(1, image=rgb, **kwargs)[0], sampler.sample(1, image=grey, **kwargs)[0])
        got, _ = sampler.sample(1, image=rgb, mask=mask, **kwargs)
        want, _ = sampler.sample(
            1, image=grey, mask=np.where(np.arange(8)[:, None] < 4, 255, 0).astype(np.uint8).repeat(8, 1), **kwargs
        )
    assert np.array_equal(got, want)
