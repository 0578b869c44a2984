"""StableDiffusionPipeline folder -> text-to-image MODEL_DIR: each part against its torch module (diffusers and
transformers, the oracles), the metadata the runtime reads, refusals that name the part, nothing left behind by a
failed export, the fp16 variant, and the TensorRT engines of `build_pipeline` against the fake tensorrt."""

import os
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from ddengine.export.onnx_export import ExportError  # noqa: E402
from ddengine.export.sd_export import PipelineExportError, export_pipeline, latent_size  # noqa: E402
from ddengine.model.pipeline_spec import PipelineSpec  # noqa: E402
from tests.support.specs import read_spec  # noqa: E402
from tests.support.tiny_pipeline import (  # noqa: E402
    HIDDEN,
    IMAGE,
    LATENT,
    PROMPTS,
    SCALE,
    TEXT_LENGTH,
    load_pipeline,
    refusing_folder,
    tiny_sd,  # noqa: F401  (fixture)
    tiny_sd16,  # noqa: F401  (fixture)
)

PSNR_DB = 40.0


@pytest.fixture(scope="module")
def oracle(tiny_sd):
    return load_pipeline(tiny_sd.pipeline)


def run(path, **feeds):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)[0]


def test_each_part_computes_what_its_torch_module_does(tiny_sd, oracle):
    ids = oracle.tokenizer(
        list(PROMPTS), padding="max_length", max_length=TEXT_LENGTH, truncation=True, return_tensors="np"
    ).input_ids.astype(np.int64)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 4, LATENT, LATENT)).astype(np.float32)
    t = np.array([1, 500, 999], dtype=np.int64)
    with torch.no_grad():
        hidden = oracle.text_encoder(torch.from_numpy(ids)).last_hidden_state
        eps = oracle.unet(torch.from_numpy(x), torch.from_numpy(t), encoder_hidden_states=hidden).sample.numpy()
        image = oracle.vae.decode(torch.from_numpy(x) / oracle.vae.config.scaling_factor).sample.numpy()
    folder = tiny_sd.model
    np.testing.assert_allclose(run(folder / "text_encoder.onnx", input_ids=ids), hidden.numpy(), atol=1e-4, rtol=0)
    got = run(folder / "unet.onnx", sample=x, timestep=t, encoder_hidden_states=hidden.numpy())
    np.testing.assert_allclose(got, eps, atol=1e-4, rtol=0)
    np.testing.assert_allclose(run(folder / "vae_decoder.onnx", latent=x), image, atol=1e-4, rtol=0)
    assert np.abs(eps).max() > 0.1 and np.abs(image).max() > 0.1  # outputs that could show an error


def test_the_vae_encoder_gives_the_posteriors_mean(tiny_sd, oracle):
    """vae_encoder.onnx: images in [-1, 1] -> vae.encode(x).latent_dist.mean, unscaled (deterministic: diffusers'
    retrieve_latents with sample_mode="argmax"); the runtime multiplies by vae_scaling_factor."""
    pictures = np.random.default_rng(1).uniform(-1, 1, (3, 3, IMAGE, IMAGE)).astype(np.float32)
    with torch.no_grad():
        posterior = oracle.vae.encode(torch.from_numpy(pictures)).latent_dist
    got = run(tiny_sd.model / "vae_encoder.onnx", image=pictures)
    assert got.shape == (3, 4, LATENT, LATENT)
    np.testing.assert_allclose(got, posterior.mean.numpy(), atol=1e-4, rtol=0)
    assert np.abs(posterior.mean.numpy()).max() > 0.1 and posterior.std.numpy().min() > 1e-3  # a mean, not a sample


def test_the_folder_describes_itself(tiny_sd, oracle):
    folder = tiny_sd.model
    assert sorted(p.name for p in folder.iterdir()) == [
        "pipeline.json",
        "text_encoder.onnx",
        "tokenizer.json",
        "unet.onnx",
        "vae_decoder.onnx",
        "vae_encoder.onnx",
    ]
    assert [p.name for p in folder.parent.iterdir() if p.name.startswith(".")] == [
        ".pipeline_vocab"
    ]  # no temporary folder
    spec = PipelineSpec.read(folder)
    assert (spec.text_length, spec.vae_scale, spec.image_channels) == (TEXT_LENGTH, SCALE, 3)
    assert spec.pad_token_id == oracle.tokenizer.pad_token_id
    assert spec.vae_scaling_factor == pytest.approx(oracle.vae.config.scaling_factor)
    assert spec.source["pipeline"] == "StableDiffusionPipeline" and spec.source["fp16"] is False
    assert spec.files["vae_encoder"] == "vae_encoder.onnx" and spec.has("vae_encoder")
    unet = read_spec(folder / "unet.onnx")
    assert unet.text_conditional and (unet.channels, unet.height, unet.width) == (4, LATENT, LATENT)
    assert unet.recommended_guidance == 7.5  # StableDiffusionPipeline's default guidance_scale
    config = oracle.scheduler.config
    for key in ("beta_schedule", "beta_start", "beta_end", "num_train_timesteps", "steps_offset", "set_alpha_to_one"):
        assert unet.scheduler[key] == config[key], key
    assert spec.image_shape(unet) == (3, IMAGE, IMAGE)


def test_the_cli_reports_each_parts_verification(tiny_sd):
    for part in ("text_encoder", "unet", "vae_decoder", "vae_encoder"):
        error = float(tiny_sd.output.split(f"{part} max |ORT - torch| = ")[1].split(",")[0].split(")")[0])
        assert error <= 1e-4, part


@pytest.mark.parametrize(
    "parts, class_name, named",
    [
        (
            ("text_encoder_2", "tokenizer_2"),
            "StableDiffusionXLPipeline",
            ["text_encoder_2 (SDXL's second text encoder)", "tokenizer_2 (SDXL's second tokenizer)"],
        ),
        (("controlnet",), "StableDiffusionControlNetPipeline", ["controlnet (ControlNet)"]),
        (("image_encoder",), None, ["image_encoder (IP-Adapter's image encoder)"]),
    ],
)
def test_unsupported_parts_are_refused_by_name(tiny_sd, tmp_path, parts, class_name, named):
    folder = refusing_folder(tiny_sd.pipeline, tmp_path / "pipe", parts=parts, class_name=class_name)
    with pytest.raises(PipelineExportError) as err:
        export_pipeline(folder, tmp_path / "out")
    for text in named:
        assert text in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe"]


@pytest.mark.parametrize(
    "config, named",
    [
        ({"addition_embed_type": "text_time"}, "addition_embed_type='text_time'"),
        ({"class_embed_type": "timestep"}, "class_embed_type='timestep'"),
        ({"encoder_hid_dim_type": "ip_image_proj"}, "encoder_hid_dim_type='ip_image_proj'"),
        ({"in_channels": 9}, "in_channels 9 != out_channels 4"),
    ],
)
def test_unet_features_beyond_text_are_refused_before_loading_weights(tiny_sd, tmp_path, config, named):
    folder = refusing_folder(tiny_sd.pipeline, tmp_path / "pipe", unet_config=config)  # the copy has no weights at all
    with pytest.raises(PipelineExportError, match=named.replace("(", r"\(").replace("[", r"\[")):
        export_pipeline(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_other_pipeline_classes_are_refused(tiny_sd, tmp_path):
    folder = refusing_folder(tiny_sd.pipeline, tmp_path / "pipe", class_name="StableDiffusionImg2ImgPipeline")
    with pytest.raises(
        PipelineExportError, match="'StableDiffusionImg2ImgPipeline' is not supported .expected StableDiffusionPipeline"
    ):
        export_pipeline(folder, tmp_path / "out")


@pytest.mark.parametrize("damaged", ["model_index.json", "unet/config.json"])
def test_a_config_nested_too_deep_is_a_clear_error(tiny_sd, tmp_path, damaged):
    folder = refusing_folder(tiny_sd.pipeline, tmp_path / "pipe")
    (folder / damaged).write_text("[" * 100_000 + "]" * 100_000)  # past the interpreter's recursion limit
    with pytest.raises(PipelineExportError, match=r"json is nested more than 32 levels deep"):
        export_pipeline(folder, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_failed_verification_leaves_nothing(tiny_sd, tmp_path, monkeypatch):
    from ddengine.export import sd_export

    def fails(*args, **kwargs):
        raise ExportError("ONNX Runtime differs from torch by 1 (> 0.0001) at batch 1")

    monkeypatch.setattr(sd_export, "verify_file", fails)
    with pytest.raises(ExportError, match="text encoder: ONNX Runtime differs"):
        export_pipeline(tiny_sd.pipeline, tmp_path / "out", log=lambda m: None)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("height, width, latent", [(None, None, (16, 16)), (48, 40, (24, 20)), (64, None, (32, 16))])
def test_latent_size_follows_height_and_width(height, width, latent):
    unet, vae = {"sample_size": LATENT, "block_out_channels": (32, 64)}, {"block_out_channels": (16, 32)}
    assert latent_size(unet, vae, height, width) == (latent, SCALE)


@pytest.mark.parametrize("height, width", [(30, 32), (32, 2), (0, 32)])
def test_sizes_the_unet_cannot_take_are_refused(height, width):
    unet, vae = {"sample_size": LATENT, "block_out_channels": (32, 64)}, {"block_out_channels": (16, 32)}
    with pytest.raises(
        PipelineExportError, match=r"multiples of 4 \(the VAE's factor 2 times the U-Net's downsampling 2\)"
    ):
        latent_size(unet, vae, height, width)


def test_fp16_parts_are_float16_and_verified(tiny_sd16):
    from ddengine.export.trt_build import onnx_precision

    spec = PipelineSpec.read(tiny_sd16.model)
    assert spec.source["fp16"] is True
    for part in ("text_encoder", "unet", "vae_decoder", "vae_encoder"):
        assert onnx_precision(onnx.load(str(spec.path(tiny_sd16.model, part)))) == "fp16", part
        assert f"{part} max |ORT - torch| = " in tiny_sd16.output


def test_fp16_samples_within_a_psnr_bound_of_fp32(tiny_sd, tiny_sd16):
    from ddengine import Sampler

    kw = dict(steps=8, seeds=[0, 1, 2], prompt=list(PROMPTS), negative_prompt=["", "a dog", ""], guidance=7.5)
    exact, _ = Sampler(tiny_sd.model, backend="ort-cpu").sample(3, **kw)
    half, _ = Sampler(tiny_sd16.model, backend="ort-cpu").sample(3, **kw)
    mse = ((exact.astype(np.float64) - half.astype(np.float64)) ** 2).reshape(3, -1).mean(axis=1)
    worst = float(np.min(10 * np.log10(255.0**2 / np.maximum(mse, 1e-12))))
    print(f"fp16 vs fp32 export: worst PSNR {worst:.1f} dB")
    assert worst >= PSNR_DB and not np.array_equal(exact, half)


def calls(fake, name):
    return [c for c in fake.state.calls if c[0] == name]


def test_build_pipeline_makes_one_engine_for_the_unet_with_guidance_rows(fake_trt, tiny_sd, tmp_path):
    from ddengine.export.trt_build import build_pipeline

    model = shutil.copytree(tiny_sd.model, tmp_path / "model")  # the build records its engine in the folder
    results = build_pipeline(model, tmp_path / "engines", precision="fp32", batch=(1, 2, 4))
    assert sorted(p.name for p in (tmp_path / "engines").iterdir()) == ["unet.plan", "unet.plan.json"]
    shapes = {c[1]: c[2:] for c in calls(fake_trt, "set_shape")}
    assert shapes["sample"] == ((1, 4, LATENT, LATENT), (4, 4, LATENT, LATENT), (8, 4, LATENT, LATENT))  # CFG rows
    assert shapes["encoder_hidden_states"] == (
        (1, TEXT_LENGTH, HIDDEN),
        (4, TEXT_LENGTH, HIDDEN),
        (8, TEXT_LENGTH, HIDDEN),
    )
    assert "input_ids" not in shapes and "latent" not in shapes  # the text encoder and VAE decoder run on the CPU
    assert results["unet"].manifest["key"]["profile"] == {"batch": [1, 2, 4], "engine_batch": [1, 4, 8]}
    again = build_pipeline(model, tmp_path / "engines", precision="fp32", batch=(1, 2, 4))
    assert list(again) == ["unet"] and again["unet"].reused and fake_trt.state.builds == 1


def test_build_pipeline_fp16_needs_the_fp16_export(fake_trt, tiny_sd, tiny_sd16, tmp_path):
    from ddengine.export.trt_build import BuildError, build_pipeline

    with pytest.raises(BuildError, match=r"unet.onnx is float32; make one with `ddengine export --fp16`"):
        build_pipeline(shutil.copytree(tiny_sd.model, tmp_path / "m32"), tmp_path / "e32")
    built = build_pipeline(shutil.copytree(tiny_sd16.model, tmp_path / "m16"), tmp_path / "e16")
    assert built["unet"].manifest["key"]["precision"] == "fp16"


def test_an_export_killed_with_9_leaves_no_staging_folder_behind_the_next_one(tmp_path):
    import subprocess
    import sys

    from ddengine.export.sd_export import remove_stale_staging, staging_prefix

    out = tmp_path / "model"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f"{staging_prefix(out)}{int(dead.stdout)}-abc"
    running = tmp_path / f"{staging_prefix(out)}{os.getpid()}-def"  # an export still at work: kept
    for folder in (stale, running):
        (folder / "part").mkdir(parents=True)
    assert remove_stale_staging(out) == [stale]
    assert not stale.exists() and running.exists()
