"""Text-to-image on the command line: `ddengine export --diffusers PIPELINE_DIR`, `ddengine sample --prompt`,
`ddengine info MODEL_DIR`, `ddengine build MODEL_DIR`; every bad input exits 2 with a message naming what was
expected and what was given, and writes nothing."""

import json
import re
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from ddengine.cli import main  # noqa: E402
from tests.support.tiny_pipeline import IMAGE, LATENT, PROMPTS, TEXT_LENGTH, refusing_folder, tiny_sd  # noqa: E402,F401
from tests.text.broken_folders import BROKEN  # noqa: E402


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def sample_args(model, out, *extra):
    return ["sample", "--model", model, "--out", out, "--steps", 4, "--backend", "ort-cpu", "--quiet", *extra]


@pytest.fixture
def model_copy(tiny_sd, tmp_path):
    """A throwaway copy of the exported MODEL_DIR, to break."""
    return shutil.copytree(tiny_sd.model, tmp_path / "model")


def test_export_writes_the_model_dir_and_reports_each_check(tiny_sd):
    assert tiny_sd.output.splitlines()[-1].startswith(f"wrote {tiny_sd.model} (text_encoder max |ORT - torch| = ")
    for text in (
        "exporting the text encoder",
        "exporting the U-Net",
        "exporting the VAE decoder",
        "exporting the VAE encoder",
        "unet max",
        "vae_decoder max",
        "vae_encoder max",
    ):
        assert text in tiny_sd.output


def test_sample_writes_prompted_images_and_records_the_prompts(tiny_sd, tmp_path):
    from ddengine import Sampler

    out = tmp_path / "out"
    result = run(
        *sample_args(
            tiny_sd.model,
            out,
            "--n",
            3,
            "--seed",
            10,
            "--prompt",
            PROMPTS[0],
            "--prompt",
            PROMPTS[1],
            "--negative-prompt",
            "blurry",
            "--guidance",
            5,
            "--height",
            IMAGE,
            "--width",
            IMAGE,
        )
    )
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in lines] == [PROMPTS[0], PROMPTS[1], PROMPTS[0]]
    assert [r["negative_prompt"] for r in lines] == ["blurry"] * 3 and {r["guidance"] for r in lines} == {5.0}
    written = np.stack([np.asarray(Image.open(out / r["file"])) for r in lines])
    assert written.shape == (3, IMAGE, IMAGE, 3)
    want, _ = Sampler(tiny_sd.model, backend="ort-cpu").sample(
        3, steps=4, seed=10, prompt=[PROMPTS[0], PROMPTS[1]], negative_prompt="blurry", guidance=5
    )
    assert np.array_equal(written, want)


@pytest.mark.parametrize("masked", [False, True], ids=["img2img", "inpainting"])
def test_sample_starts_from_an_image_and_mask_files(tiny_sd, tmp_path, masked):
    """--image/--strength (and --mask: inpainting) on a MODEL_DIR: the images are the Sampler's, the manifest says so."""
    from ddengine import Sampler

    picture = np.random.default_rng(5).integers(0, 256, (IMAGE, IMAGE, 3), dtype=np.uint8)
    mask = np.zeros((IMAGE, IMAGE), np.uint8)
    mask[8:24, 4:20] = 255
    Image.fromarray(picture).save(tmp_path / "in.png")
    Image.fromarray(mask).save(tmp_path / "m.png")
    extra = ["--mask", tmp_path / "m.png"] if masked else []
    out = tmp_path / "out"
    result = run(
        *sample_args(tiny_sd.model, out, "--n", 2, "--prompt", "a cat", "--image", tmp_path / "in.png"),
        *["--strength", 0.6, *extra],
    )
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert {(r["strength"], r["inpainting"]) for r in lines} == {(0.6, masked)}
    written = np.stack([np.asarray(Image.open(out / r["file"])) for r in lines])
    start = dict(image=picture, strength=0.6, mask=mask if masked else None)
    want, _ = Sampler(tiny_sd.model, backend="ort-cpu").sample(2, steps=4, prompt="a cat", **start)
    assert np.array_equal(written, want)


def test_sample_defaults_to_the_exported_guidance_and_no_negative_prompt(tiny_sd, tmp_path):
    result = run(
        *sample_args(tiny_sd.model, tmp_path / "out", "--n", 1, "--prompt", "a cat", "--grid", tmp_path / "grid.png")
    )
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "out" / "manifest.jsonl").read_text().splitlines()[0])  # then the grid's line
    assert record["guidance"] == 7.5 and record["negative_prompt"] == "" and record["class"] is None
    image = np.asarray(Image.open(tmp_path / "out" / record["file"]))
    assert np.array_equal(
        np.asarray(Image.open(tmp_path / "grid.png"))[2 : 2 + IMAGE, 2 : 2 + IMAGE], image
    )  # 2 px padding


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--class", "1", "--prompt", "a cat"],
            "classes=[1] given, but this text-to-image model takes prompt, not classes",
        ),
        ([], "this text-to-image model needs prompt (a string, or a list of strings cycled over the images)"),
        (["--negative-prompt", "blurry"], "this text-to-image model needs prompt"),
        (
            ["--prompt", "a cat", "--height", 64],
            f"ask for 64x{IMAGE} images; this model was exported for {IMAGE}x{IMAGE} "
            f"(latents {LATENT}x{LATENT} times the VAE's scale 2)",
        ),
        (["--prompt", "a cat", "--width", 16], f"ask for {IMAGE}x16 images"),
        (["--prompt", "a cat", "--height", 0], "expected a positive number of pixels, got 0"),
        (["--prompt", "a cat", "--trajectory", 2], "trajectory snapshots are of pixel-space models"),
        (["--prompt", "a cat", "--guidance", -1], "guidance must be a finite number >= 0, got -1.0"),
        (["--prompt", "a cat", "--backend", "tensorflow"], "unknown backend 'tensorflow'"),
    ],
)
def test_bad_text_to_image_input_exits_2_and_writes_nothing(tiny_sd, tmp_path, args, message):
    result = run(*sample_args(tiny_sd.model, tmp_path / "out", *args))
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag", ["--prompt", "--negative-prompt"])
def test_prompts_given_to_a_class_model_exit_2(cond_model, tmp_path, flag):
    result = run(*sample_args(cond_model, tmp_path / "out", flag, "a cat"))
    assert result.exit_code == 2
    assert (
        "need a text-to-image MODEL_DIR (`ddengine export --diffusers`); this model takes 4 classes: give classes"
        in result.output
    )
    assert not (tmp_path / "out").exists()


def test_height_of_a_class_model_is_its_fixed_size(cond_model, tmp_path):
    result = run(*sample_args(cond_model, tmp_path / "out", "--height", 16))
    assert result.exit_code == 2 and "ask for 16x8 images; this model makes 8x8 images only" in result.output


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda m: (m / "vae_decoder.onnx").unlink(), "lacks vae_decoder.onnx named by its pipeline.json"),
        (lambda m: (m / "pipeline.json").unlink(), "has no pipeline.json: not a ddengine text-to-image model folder"),
        (lambda m: (m / "tokenizer.json").write_text("{not json"), "cannot read tokenizer"),
        (lambda m: (m / "text_encoder.onnx").write_bytes(b"\x00\x01"), "text_encoder.onnx"),
        (
            lambda m: (m / "pipeline.json").write_text(
                json.dumps({**json.loads((m / "pipeline.json").read_text()), "vae_scale": 0})
            ),
            "vae_scale must be an integer in [1, 64], got 0",
        ),
        (
            lambda m: (m / "pipeline.json").write_text(
                json.dumps({**json.loads((m / "pipeline.json").read_text()), "text_length": 10**9})
            ),
            "text_length must be an integer in [1, 4096], got 1000000000",  # the tokenizer would abort the process
        ),
        (
            lambda m: (m / "pipeline.json").write_text(
                json.dumps(
                    {
                        **json.loads((m / "pipeline.json").read_text()),
                        "files": {
                            **json.loads((m / "pipeline.json").read_text())["files"],
                            "vae_decoder": str(m.parent / "elsewhere.onnx"),
                        },
                    }
                )
            ),
            "leads out of",  # an absolute path outside MODEL_DIR is not loaded
        ),
        (lambda m: (m / "pipeline.json").write_text("[" * 100_000 + "]" * 100_000), "nested more than 32 levels deep"),
    ],
)
def test_a_damaged_model_dir_exits_2_naming_the_problem(model_copy, tmp_path, damage, message):
    damage(model_copy)
    result = run(*sample_args(model_copy, tmp_path / "out", "--prompt", "a cat"))
    assert result.exit_code == 2, result.output
    assert message in result.output and not (tmp_path / "out").exists()
    info = run("info", model_copy)
    assert info.exit_code == 2 and message in info.output and "Traceback" not in info.output


@pytest.mark.parametrize("case", BROKEN)
def test_a_model_dir_its_graphs_disagree_with_exits_2_before_sampling(model_copy, tmp_path, case):
    damage, message = BROKEN[case]
    damage(model_copy)
    result = run(*sample_args(model_copy, tmp_path / "out", "--prompt", "a cat"))
    assert result.exit_code == 2, result.output
    assert result.output.splitlines()[-1] == f"Error: {message}" and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_info_prints_the_pipeline_then_the_unet(tiny_sd):
    from ddengine.backends import auto_choice
    from ddengine.text.parts import part_backend

    result = run("info", tiny_sd.model, "--steps", 4)
    assert result.exit_code == 0, result.output
    out = result.output
    assert f"pipeline {tiny_sd.model}  (StableDiffusionPipeline" in out
    assert f"input_ids [batch, {TEXT_LENGTH}] -> hidden_states [batch, {TEXT_LENGTH}, 32]  runs on ort-cpu (fp32" in out
    choice = auto_choice()
    assert "unet.onnx" in out and f"runs on {choice.name} ({choice.precision}; --backend)" in out
    assert "vae_decoder.onnx" in out and "runs on {} ({}; --backend, on the CPU)".format(*part_backend("auto")) in out
    assert re.search(r"tokenizer\s+tokenizer.json \(0.0 MiB\)  \d+ tokens in its vocabulary", out)
    assert f"{TEXT_LENGTH} tokens per prompt" in out
    assert f"latents 4x{LATENT}x{LATENT} -> images 3x{IMAGE}x{IMAGE} (VAE scale 2, scaling factor 0.18215)" in out
    assert f"model   {tiny_sd.model / 'unet.onnx'}" in out and "recommended guidance 7.5" in out
    assert f"'encoder_hidden_states' float32 [-1, {TEXT_LENGTH}, 32]" in out
    assert "timesteps [751, 501, 251, 1]" in out  # the U-Net's DDIM plan: leading spacing, steps_offset 1


def test_export_refuses_unsupported_parts_by_name(tiny_sd, tmp_path):
    folder = refusing_folder(
        tiny_sd.pipeline,
        tmp_path / "sdxl",
        parts=("text_encoder_2", "tokenizer_2"),
        class_name="StableDiffusionXLPipeline",
    )
    result = run("export", "--diffusers", folder, "-o", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert "text_encoder_2 (SDXL's second text encoder)" in result.output and not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "out, extra, message",
    [
        ("nonempty", [], "exists and is not empty; choose a new -o"),
        ("file", [], "is a file; a pipeline exports to a folder"),
        ("missing/out", [], "does not exist"),
        ("new", ["--height", 30], "--height/--width must be positive multiples of 4"),
        ("new", ["--width", -8], "--width must be a positive number of pixels, got -8"),
    ],
)
def test_export_bad_output_or_size_exits_2_and_writes_nothing(tiny_sd, tmp_path, out, extra, message):
    (tmp_path / "nonempty").mkdir()
    (tmp_path / "nonempty" / "keep.txt").write_text("mine")
    (tmp_path / "file").write_text("mine")
    before = sorted(p.name for p in tmp_path.iterdir())
    result = run("export", "--diffusers", tiny_sd.pipeline, "-o", tmp_path / out, *extra)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert (
        sorted(p.name for p in tmp_path.iterdir()) == before
        and (tmp_path / "nonempty" / "keep.txt").read_text() == "mine"
    )


def test_export_height_is_for_pipelines_only(tmp_path):
    result = run("export", "--diffusers", tmp_path, "-o", tmp_path / "m.onnx", "--height", 64)
    assert result.exit_code == 2 and "--height/--width apply to StableDiffusionPipeline folders only" in result.output


def test_build_model_dir_builds_the_unets_engine_then_reuses_it(fake_trt, model_copy, tmp_path):
    args = ["build", model_copy, "-o", tmp_path / "engines", "--precision", "fp32", "--batch", "1:2:4"]
    first = run(*args)
    assert first.exit_code == 0, first.output
    assert "unet: built" in first.output and "(fp32, batch 1:2:4)" in first.output
    assert "text_encoder, vae_decoder, vae_encoder: no engine (they run on the CPU" in first.output
    assert sorted(p.name for p in (tmp_path / "engines").iterdir()) == ["unet.plan", "unet.plan.json"]
    assert (model_copy / "unet.engines.json").is_file()  # where --backend tensorrt finds it
    second = run(*args)
    assert second.exit_code == 0 and second.output.count(" reused ") == 1 and fake_trt.state.builds == 1


def test_build_fp16_of_an_fp32_model_dir_exits_1_naming_the_fix(fake_trt, model_copy, tmp_path):
    result = run("build", model_copy, "-o", tmp_path / "engines")
    assert result.exit_code == 1 and "ddengine export --fp16" in result.output
    assert not list((tmp_path / "engines").glob("*.plan")) if (tmp_path / "engines").exists() else True


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda m: (m / "unet.onnx").unlink(), "lacks unet.onnx"),
        (lambda m: (m / "pipeline.json").unlink(), "has no pipeline.json"),
    ],
)
def test_build_of_a_damaged_model_dir_exits_2(fake_trt, model_copy, damage, message):
    damage(model_copy)
    result = run("build", model_copy, "--precision", "fp32")
    assert result.exit_code == 2 and message in result.output and fake_trt.state.builds == 0


def test_build_model_dir_without_tensorrt_exits_2(no_trt, tiny_sd):
    result = run("build", tiny_sd.model)
    assert result.exit_code == 2 and "pip install ddengine[gpu]" in result.output
