"""Image-to-image and inpainting of an exported tiny pipeline against diffusers' StableDiffusionImg2ImgPipeline and
StableDiffusionInpaintPipeline (a 4-channel U-Net: the known region re-noised and blended after every step), both
built from the tiny StableDiffusionPipeline's components (the oracles).

diffusers is given the engine's noise and the VAE posterior's mean: its pipeline module's `randn_tensor` (called once,
for the noise the image is noised with) returns the engine's Philox x_T of each seed, its schedulers' `randn_tensor`
the engine's per-step noise (DDPM, euler-a), and its `retrieve_latents` takes `latent_dist.mode()` (the mean of a
diagonal Gaussian: diffusers' sample_mode="argmax") where the pipelines draw a sample, as the exported VAE encoder
gives the mean. Also: a folder exported before the VAE encoder, sizes refused by name, the HTTP endpoints.
"""

import base64
import io
import json
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from diffusers.pipelines.stable_diffusion import (  # noqa: E402
    pipeline_stable_diffusion_img2img,
    pipeline_stable_diffusion_inpaint,
)
from diffusers.schedulers import scheduling_ddim, scheduling_ddpm, scheduling_euler_ancestral_discrete  # noqa: E402
from PIL import Image  # noqa: E402

from ddengine import Sampler  # noqa: E402
from ddengine.core.plan import METHODS  # noqa: E402
from ddengine.core.solvers.classes import METHOD_CLASSES  # noqa: E402
from ddengine.runtime.init_state import NO_ENCODER  # noqa: E402
from ddengine.runtime.params import InvalidParameterError  # noqa: E402
from tests.support.tiny_pipeline import IMAGE, LATENT, PROMPTS, load_pipeline, tiny_sd  # noqa: E402,F401
from tests.text.test_pipeline import initial_noise, level_difference, step_noise  # noqa: E402

SEEDS = [0, 7, 123456789]
NEGATIVES = ["", "a dog", "blurry"]
STEPS, GUIDANCE, MAX_LEVELS = 10, 7.5, 2
STRENGTHS = (0.3, 0.6, 1.0)
PIPELINE_MODULES = (pipeline_stable_diffusion_img2img, pipeline_stable_diffusion_inpaint)
SCHEDULER_MODULES = (scheduling_ddpm, scheduling_ddim, scheduling_euler_ancestral_discrete)


def pictures():
    """Three distinct uint8 32x32 RGB pictures (stripes and ramps)."""
    y, x = np.mgrid[:IMAGE, :IMAGE]
    return [
        np.stack([(x * 8 + 40 * k) % 256, (y * 8) % 256, ((x + y) * 4 + 80 * k) % 256], -1).astype(np.uint8)
        for k in range(3)
    ]


def block_mask():
    """White (repaint) rows 6..21 and columns 3..18: an odd edge, so the latent mask shows the downsampling rule
    (nearest: latent pixel i is image pixel 2i); rows 6 and 22, which it samples, are 128 and 127: either side of 50%
    white (diffusers binarises the mask before downsampling it)."""
    mask = np.zeros((IMAGE, IMAGE), np.uint8)
    mask[6:22, 3:19] = 255
    mask[6, 3:19], mask[22, 3:19] = 128, 127
    return mask


@pytest.fixture(scope="module")
def oracles(tiny_sd):
    """(img2img, inpaint): diffusers' pipelines over one set of the tiny pipeline's components."""
    components = load_pipeline(tiny_sd.pipeline).components
    pipes = tuple(
        cls(**components, requires_safety_checker=False)
        for cls in (diffusers.StableDiffusionImg2ImgPipeline, diffusers.StableDiffusionInpaintPipeline)
    )
    for pipe in pipes:
        pipe.set_progress_bar_config(disable=True)
    return pipes


@pytest.fixture(scope="module")
def sampler(tiny_sd):
    with Sampler(tiny_sd.model, backend="ort-cpu") as s:
        yield s


def engine_noise(monkeypatch, seeds, latents=None):
    """diffusers draws the engine's noise: the pipelines' one randn_tensor call gets x_T of the seeds (or `latents`),
    the schedulers' calls each step's noise; the VAE posterior's mean for its sample. Returns the draws' shapes."""
    drawn = {"initial": [], "step": []}

    def initial(shape, generator=None, device=None, dtype=None, layout=None):
        drawn["initial"].append(tuple(shape))
        return torch.from_numpy(initial_noise(seeds) if latents is None else latents).to(dtype)

    def step(shape, generator=None, device=None, dtype=None, layout=None):
        drawn["step"].append(tuple(shape))
        return torch.from_numpy(step_noise(seeds, tuple(shape), len(drawn["step"]) - 1)).to(dtype)

    for module in PIPELINE_MODULES:
        monkeypatch.setattr(module, "randn_tensor", initial)
        monkeypatch.setattr(
            module, "retrieve_latents", lambda out, generator=None, sample_mode="": out.latent_dist.mode()
        )
    for module in SCHEDULER_MODULES:
        monkeypatch.setattr(module, "randn_tensor", step)
    return drawn


def oracle_images(pipe, monkeypatch, method, **kwargs):
    """uint8 (3, H, W, 3) of a diffusers pipeline run with the scheduler class of `method` and the engine's noise."""
    name, keys = METHOD_CLASSES[method]
    monkeypatch.setattr(pipe, "scheduler", getattr(diffusers, name).from_config(pipe.scheduler.config, **keys))
    out = pipe(
        list(PROMPTS),
        negative_prompt=NEGATIVES,
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        output_type="np",
        **kwargs,
    ).images
    return np.rint(np.clip(out, 0, 1) * 255).astype(np.uint8)


def ours(sampler, method, **kwargs):
    images, records = sampler.sample(
        3,
        steps=STEPS,
        method=method,
        seeds=SEEDS,
        prompt=list(PROMPTS),
        negative_prompt=NEGATIVES,
        guidance=GUIDANCE,
        batch_size=3,
        **kwargs,
    )
    assert all(r["status"] == "ok" for r in records)
    return images, records


def assert_close(mine, theirs, what):
    levels, differing = level_difference(mine, theirs)
    print(f"{what}: max {levels} levels, {100 * differing:.3f}% of values differ")
    assert mine.shape == theirs.shape == (3, IMAGE, IMAGE, 3)
    assert levels <= MAX_LEVELS, (levels, differing)


@pytest.mark.parametrize("strength", STRENGTHS)
@pytest.mark.parametrize("method", METHODS)
def test_img2img_matches_diffusers_img2img_pipeline(sampler, oracles, monkeypatch, method, strength):
    """One picture per image: each encoded (the posterior's mean times the scaling factor), noised to the strength's
    first step with the seed's Philox noise, and sampled from there (diffusers' get_timesteps)."""
    images = pictures()
    mine, records = ours(sampler, method, image=images, strength=strength)
    drawn = engine_noise(monkeypatch, SEEDS)
    theirs = oracle_images(
        oracles[0], monkeypatch, method, image=[Image.fromarray(p) for p in images], strength=strength
    )
    assert drawn["initial"] == [(3, 4, LATENT, LATENT)]  # the image's noise came from the engine
    assert len(drawn["step"]) == (int(STEPS * strength) if method in ("ddpm", "euler-a") else 0)
    assert_close(mine, theirs, f"img2img {method} strength {strength}")
    assert {(r["strength"], r["inpainting"]) for r in records} == {(strength, False)}


@pytest.mark.parametrize("strength", [0.6, 1.0])
@pytest.mark.parametrize("method", METHODS)
def test_inpainting_matches_diffusers_inpaint_pipeline(sampler, oracles, monkeypatch, method, strength):
    """One picture and mask for all three images: the known region (black) re-noised to each step's level with the
    same noise and blended after every step in latent space, the mask at the latent size by nearest sampling; the
    decoded latents are the output (diffusers pastes the picture back only with padding_mask_crop)."""
    picture, mask = pictures()[0], block_mask()
    mine, records = ours(sampler, method, image=picture, mask=mask, strength=strength)
    engine_noise(monkeypatch, SEEDS)
    theirs = oracle_images(
        oracles[1],
        monkeypatch,
        method,
        image=Image.fromarray(picture),
        mask_image=Image.fromarray(mask),
        strength=strength,
        height=IMAGE,
        width=IMAGE,
    )
    assert_close(mine, theirs, f"inpainting {method} strength {strength}")
    assert {(r["strength"], r["inpainting"]) for r in records} == {(strength, True)}


def test_the_default_strength_is_diffusers(sampler):
    """0.8 for image-to-image, 1 with a mask (diffusers' img2img and inpaint defaults)."""
    _, records = sampler.sample(1, steps=5, prompt="a cat", image=pictures()[0])
    assert records[0]["strength"] == 0.8
    _, records = sampler.sample(1, steps=5, prompt="a cat", image=pictures()[0], mask=block_mask())
    assert records[0]["strength"] == 1.0 and records[0]["inpainting"]


@pytest.mark.parametrize("method", ["ddim", "euler"])
def test_latents_are_the_noise_the_image_is_noised_with(sampler, oracles, monkeypatch, method):
    """image= and latents= together: the caller's latents replace the seeds' noise, as if diffusers drew them."""
    latents = np.random.default_rng(3).standard_normal((3, 4, LATENT, LATENT)).astype(np.float32)
    mine, records = ours(sampler, method, image=pictures(), strength=0.6, latents=latents)
    engine_noise(monkeypatch, SEEDS, latents=latents)
    theirs = oracle_images(
        oracles[0], monkeypatch, method, image=[Image.fromarray(p) for p in pictures()], strength=0.6
    )
    assert_close(mine, theirs, f"img2img {method} with latents")
    assert records[0]["latents"]


def test_the_encoder_runs_once_per_request_on_its_distinct_images(sampler, monkeypatch):
    """One picture for four images: one encoder run of one image, before any step; the images equal four requests."""
    encoder, runs = sampler.parts.encoder, []
    monkeypatch.setattr(encoder, "part", lambda image, part=encoder.part: runs.append(len(image)) or part(image=image))
    request = sampler.request(4, steps=5, prompt="a cat", image=pictures()[1], strength=0.5, batch_size=2)
    assert runs == [1] and request.init.pixels is None and request.init.images.shape == (1, 4, LATENT, LATENT)
    together, _ = sampler.run(request)
    alone = [sampler.sample(1, steps=5, prompt="a cat", seed=i, image=pictures()[1], strength=0.5)[0] for i in range(4)]
    assert runs == [1] * 5 and np.array_equal(together, np.concatenate(alone))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (
            dict(image=np.zeros((LATENT, LATENT, 3), np.uint8)),
            f"image must be {IMAGE}x{IMAGE} (W x H, the size this model makes), got {LATENT}x{LATENT}",
        ),
        (
            dict(image=np.zeros((IMAGE, IMAGE, 3), np.uint8), mask=np.zeros((LATENT, LATENT), np.uint8)),
            f"mask must be {IMAGE}x{IMAGE} (the image's size), got {LATENT}x{LATENT}",
        ),
        (dict(image=[np.zeros((IMAGE, IMAGE, 3), np.uint8)] * 2), "give one image or n = 3 images, got 2"),
        (dict(image=np.zeros((IMAGE, IMAGE, 3), np.float32)), "image must be a uint8 (H, W, C)"),
    ],
)
def test_bad_images_and_masks_are_refused_naming_the_size(sampler, kwargs, message):
    with pytest.raises(InvalidParameterError) as err:
        sampler.request(3, steps=STEPS, prompt="a cat", **kwargs)
    assert message in str(err.value)


@pytest.fixture
def without_encoder(tiny_sd, tmp_path):
    """A copy of the MODEL_DIR as exported before the VAE encoder: no vae_encoder.onnx, none in pipeline.json."""
    folder = shutil.copytree(tiny_sd.model, tmp_path / "model")
    spec = json.loads((folder / "pipeline.json").read_text())
    del spec["files"]["vae_encoder"]
    (folder / "pipeline.json").write_text(json.dumps(spec))
    (folder / "vae_encoder.onnx").unlink()
    return folder


def test_a_folder_without_encoder_samples_text_and_latents_and_names_the_reexport(tiny_sd, sampler, without_encoder):
    latents = np.random.default_rng(4).standard_normal((2, 4, LATENT, LATENT)).astype(np.float32)
    kw = dict(steps=4, prompt=["a cat", "a dog"], guidance=7.5)
    with Sampler(without_encoder, backend="ort-cpu") as old:
        assert old.parts.encoder is None
        assert np.array_equal(old.sample(2, **kw)[0], sampler.sample(2, **kw)[0])
        assert np.array_equal(old.sample(2, latents=latents, **kw)[0], sampler.sample(2, latents=latents, **kw)[0])
        for start in (dict(image=pictures()[0]), dict(image=pictures()[0], mask=block_mask())):
            with pytest.raises(InvalidParameterError) as err:
                old.request(2, **kw, **start)
            assert str(err.value) == NO_ENCODER
    assert "`ddengine export --diffusers PIPELINE_DIR -o MODEL_DIR`" in NO_ENCODER


def png_base64(array):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_the_http_endpoints_take_an_image_and_mask_for_a_text_model(sampler):
    """POST /v1/images (base64 fields) and OpenAI's /v1/images/edits (a form; transparent = repaint) give the
    Sampler's images."""
    from fastapi.testclient import TestClient

    from ddengine.serving.app import Settings, create_app

    picture, mask = pictures()[2], block_mask()
    body = {"n": 2, "steps": 6, "seed": 5, "prompt": "a red shoe", "strength": 0.7}
    want, _ = sampler.sample(**body, image=picture)
    wanted_edit, _ = sampler.sample(
        **(body | {"strength": 0.9}), image=picture, mask=np.where(mask >= 128, 255, 0).astype(np.uint8)
    )
    rgba = np.dstack([picture, np.where(mask >= 128, 0, 255).astype(np.uint8)])
    with TestClient(create_app(sampler, Settings(max_batch=4, max_queue=8))) as http:
        native = http.post("/v1/images", json=body | {"image": png_base64(picture)})
        edit = http.post(
            "/v1/images/edits",
            files={
                "image": ("start.png", base64.b64decode(png_base64(picture)), "image/png"),
                "mask": ("mask.png", base64.b64decode(png_base64(rgba)), "image/png"),
            },
            data={"prompt": "a red shoe", "n": "2", "seed": "5", "steps": "6", "strength": "0.9"},
        )
    assert native.status_code == 200, native.text
    got = np.stack([np.asarray(Image.open(io.BytesIO(base64.b64decode(i["png"])))) for i in native.json()["images"]])
    assert np.array_equal(got, want)
    assert edit.status_code == 200, edit.text
    edited = np.stack(
        [np.asarray(Image.open(io.BytesIO(base64.b64decode(d["b64_json"])))) for d in edit.json()["data"]]
    )
    assert np.array_equal(edited, wanted_edit)


def test_the_openai_size_of_a_text_model_is_its_decoded_images(sampler):
    """OpenAI's size is the images' WxH (the VAE's output), not the U-Net's latents."""
    from fastapi.testclient import TestClient

    from ddengine.serving.app import Settings, create_app

    h, w, _ = sampler.image_shape
    latent = f"{sampler.spec.width}x{sampler.spec.height}"
    assert (h, w) != (sampler.spec.height, sampler.spec.width)
    with TestClient(create_app(sampler, Settings(max_batch=4, max_queue=8))) as http:
        ok = http.post("/v1/images/generations", json={"prompt": "a cat", "size": f"{w}x{h}", "steps": 2})
        wrong = http.post("/v1/images/generations", json={"prompt": "a cat", "size": latent, "steps": 2})
    assert ok.status_code == 200 and ok.json()["size"] == f"{w}x{h}", ok.text
    image = Image.open(io.BytesIO(base64.b64decode(ok.json()["data"][0]["b64_json"])))
    assert image.size == (w, h)
    assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "size"
    assert f"size must be '{w}x{h}'" in wrong.json()["error"]["message"]
