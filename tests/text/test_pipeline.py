"""Text-to-image sampling of an exported tiny pipeline against diffusers' own StableDiffusionPipeline (the oracle):
the engine's initial noise goes in as `latents=`, and for DDPM and DDIM eta > 0 the engine's per-step noise is
what diffusers' scheduler draws. Also: batch-size invariance with mixed prompts, one text-encoder run per
distinct prompt, the tokenizer against transformers', OpenVINO within a PSNR bound of ONNX Runtime, and the
memory of loading a large single-file ONNX.
"""

import json
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from ddengine import Sampler  # noqa: E402
from ddengine.core.solvers.classes import METHOD_CLASSES  # noqa: E402
from ddengine.kernels import _step  # noqa: E402
from ddengine.kernels.host import image_records  # noqa: E402
from ddengine.quality.metrics import psnr  # noqa: E402
from tests.support.kernel_oracle import single_step_rows  # noqa: E402
from tests.support.tiny_pipeline import IMAGE, LATENT, PROMPTS, TEXT_LENGTH, load_pipeline, tiny_sd  # noqa: E402,F401

LONG = "a photo of " + "a red shoe and " * 30 + "a cat"  # over 77 tokens: both truncate it
NOISE_ONLY = single_step_rows([[0, 0, 0, 0, 0, 0, 0, 0, 1]])  # x' = z (engine/core/rows.py column order)
SEEDS = [0, 7, 123456789]
MAX_LEVELS, MAX_DIFFERING = 2, 0.01
PSNR_DB = 40.0


def initial_noise(seeds):
    """x_T of each seed, as the engine draws it (Philox, domain 1)."""
    latents = np.empty((len(seeds), 4, LATENT, LATENT), np.float32)
    _step.fill_noise(latents, np.asarray(seeds, np.uint64))
    return latents


def step_noise(seeds, shape, step):
    """The noise the engine's fused step adds at `step`, extracted with a sigma-only coefficient row."""
    x = np.zeros(shape, np.float32)
    images = image_records(seeds)
    images["step"] = step
    _step.step(x, np.zeros(shape, np.float32), NOISE_ONLY, images)
    return x


@pytest.fixture(scope="module")
def oracle(tiny_sd):
    pipe = load_pipeline(tiny_sd.pipeline)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sampler(tiny_sd):
    with Sampler(tiny_sd.model, backend="ort-cpu") as s:
        yield s


def diffusers_images(pipe, monkeypatch, method, prompts, negatives, seeds, steps, guidance, eta=0.0):
    """uint8 (n, H, W, 3) from diffusers with the engine's noise, its scheduler the class of `method` built from the
    pipeline's config (engine/core/solvers/classes.py); and how many step noises diffusers drew."""
    import diffusers
    from diffusers.schedulers import scheduling_ddim, scheduling_ddpm, scheduling_euler_ancestral_discrete

    name, keys = METHOD_CLASSES[method]
    monkeypatch.setattr(pipe, "scheduler", getattr(diffusers, name).from_config(pipe.scheduler.config, **keys))
    drawn = []

    def engine_noise(shape, generator=None, device=None, dtype=None, layout=None):
        drawn.append(tuple(shape))
        return torch.from_numpy(step_noise(seeds, tuple(shape), len(drawn) - 1)).to(dtype)

    for module in (scheduling_ddpm, scheduling_ddim, scheduling_euler_ancestral_discrete):
        monkeypatch.setattr(module, "randn_tensor", engine_noise)
    out = pipe(
        list(prompts),
        negative_prompt=None if negatives is None else list(negatives),
        num_inference_steps=steps,
        guidance_scale=guidance,
        eta=eta,
        latents=torch.from_numpy(initial_noise(seeds)),
        height=IMAGE,
        width=IMAGE,
        output_type="np",
    ).images
    return np.rint(np.clip(out, 0, 1) * 255).astype(np.uint8), len(drawn)


def level_difference(a, b):
    """(max |a - b| in uint8 levels, fraction of values that differ)."""
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return int(d.max()), float((d > 0).mean())


SETTINGS = {  # method, eta, guidance, negative prompts (None: diffusers' and the engine's default "")
    "ddim-eta0-negatives": ("ddim", 0.0, 7.5, ["", "a dog", "blurry"]),
    "ddim-eta0-no-negatives": ("ddim", 0.0, 3.0, None),
    "ddim-eta0-no-guidance": ("ddim", 0.0, 1.0, None),
    "ddpm-negatives": ("ddpm", 0.0, 7.5, ["blurry", "", "a dog"]),
    "ddim-eta1-no-negatives": ("ddim", 1.0, 7.5, None),
    **{f"{m}-negatives": (m, 0.0, 7.5, ["", "a dog", "blurry"]) for m in METHOD_CLASSES if m not in ("ddim", "ddpm")},
}
STOCHASTIC = ("ddpm", "euler-a")


@pytest.mark.parametrize("setting", SETTINGS)
def test_images_match_diffusers_stable_diffusion_pipeline(sampler, oracle, monkeypatch, setting):
    method, eta, guidance, negatives = SETTINGS[setting]
    prompts, steps = [PROMPTS[0], LONG, PROMPTS[2]], 10
    ours, records = sampler.sample(
        3,
        steps=steps,
        method=method,
        eta=eta,
        seeds=SEEDS,
        prompt=prompts,
        negative_prompt=negatives,
        guidance=guidance,
        batch_size=3,
    )
    theirs, drawn = diffusers_images(oracle, monkeypatch, method, prompts, negatives, SEEDS, steps, guidance, eta)
    assert drawn == (steps if method in STOCHASTIC or eta > 0 else 0)  # every step's noise came from the engine
    assert ours.shape == theirs.shape == (3, IMAGE, IMAGE, 3)
    levels, differing = level_difference(ours, theirs)
    print(f"{setting}: max {levels} levels, {100 * differing:.3f}% of values differ")
    assert levels <= MAX_LEVELS and differing < MAX_DIFFERING, (levels, differing)
    assert [r["prompt"] for r in records] == prompts
    assert [r["negative_prompt"] for r in records] == (negatives or [""] * 3)


def test_a_scheduler_config_class_selects_the_solver_diffusers_runs(tiny_sd, oracle, monkeypatch):
    """No method given: the config's DPMSolverMultistepScheduler (with its Karras key) is what runs, as in diffusers
    with that scheduler."""
    import diffusers

    override = {"_class_name": "DPMSolverMultistepScheduler", "use_karras_sigmas": True}
    with Sampler(tiny_sd.model, backend="ort-cpu", scheduler_config=override) as s:
        ours, records = s.sample(2, steps=8, seeds=SEEDS[:2], prompt=PROMPTS[:2], guidance=7.5)
    assert {r["method"] for r in records} == {"dpmpp-2m"}
    dpm = diffusers.DPMSolverMultistepScheduler.from_config(oracle.scheduler.config, use_karras_sigmas=True)
    monkeypatch.setattr(oracle, "scheduler", dpm)
    out = oracle(
        list(PROMPTS[:2]),
        num_inference_steps=8,
        guidance_scale=7.5,
        latents=torch.from_numpy(initial_noise(SEEDS[:2])),
        height=IMAGE,
        width=IMAGE,
        output_type="np",
    ).images
    levels, differing = level_difference(ours, np.rint(np.clip(out, 0, 1) * 255).astype(np.uint8))
    assert levels <= MAX_LEVELS and differing < MAX_DIFFERING, (levels, differing)


def test_the_prompt_changes_the_image(sampler):
    """Same seed, other prompt: a different image (the parity above is not of prompt-blind outputs)."""
    images, _ = sampler.sample(2, steps=6, seeds=[5, 5], prompt=[PROMPTS[0], PROMPTS[1]], guidance=7.5)
    assert level_difference(images[0], images[1])[0] > 20


def test_an_image_depends_only_on_its_seed_prompt_and_parameters(tiny_sd):
    """Mixed prompts and negative prompts: batch sizes 5, 2 and each image alone (fresh samplers, so no embedding is
    reused from a cache) give bit-identical images on the exact fp32 backend."""
    prompts, negatives = list(PROMPTS), ["", "a dog"]
    kw = dict(steps=6, guidance=7.5, method="ddim", eta=0.5)
    together, _ = Sampler(tiny_sd.model, backend="ort-cpu").sample(
        5, prompt=prompts, negative_prompt=negatives, batch_size=5, **kw
    )
    pairs, _ = Sampler(tiny_sd.model, backend="ort-cpu").sample(
        5, prompt=prompts, negative_prompt=negatives, batch_size=2, **kw
    )
    alone = [
        Sampler(tiny_sd.model, backend="ort-cpu").sample(
            1, seeds=[i], prompt=prompts[i % 3], negative_prompt=negatives[i % 2], **kw
        )[0][0]
        for i in range(5)
    ]
    assert np.array_equal(together, pairs) and np.array_equal(together, np.stack(alone))


def test_the_memory_check_counts_decoded_images_not_latents(tiny_sd, sampler, monkeypatch):
    from ddengine.runtime import capacity
    from ddengine.runtime.params import InvalidParameterError

    image, _ = sampler.sample(1, steps=1, prompt=PROMPTS[0])
    free = iter([2**60, 1])  # the forward fits (the request's check); the images kept by sample() do not
    monkeypatch.setattr(capacity, "available_memory", lambda: next(free))
    with pytest.raises(InvalidParameterError) as err:
        sampler.sample(1000, steps=1, prompt=PROMPTS[0])
    kept = 1000 * (image[0].nbytes + capacity.RECORD_BYTES)  # the uint8 images sample() returns, and their records
    assert f"n = 1000 images kept in memory need {capacity.human_bytes(kept)}" in str(err.value)


def test_the_text_encoder_runs_once_per_distinct_prompt(tiny_sd):
    with Sampler(tiny_sd.model, backend="ort-cpu") as s:
        encoder, rows = s.parts.conditioner.text_encoder, []
        s.parts.conditioner.text_encoder = lambda input_ids: rows.append(len(input_ids)) or encoder(input_ids=input_ids)
        prompts = ["a cat", "a dog", "a cat", "a red shoe", "a dog"]
        first, _ = s.sample(5, steps=3, prompt=prompts, negative_prompt="blurry", guidance=7.5)
        assert sorted(rows) == [1, 3]  # the three distinct prompts in one run, the negative prompt in another
        again, _ = s.sample(5, steps=3, prompt=prompts, negative_prompt="blurry", guidance=7.5)
        assert sorted(rows) == [1, 3] and np.array_equal(first, again)


def test_tokenizer_matches_transformers_clip_tokenizer(tiny_sd, oracle):
    from ddengine.model.pipeline_spec import PipelineSpec
    from ddengine.text.tokenizer import PromptTokenizer

    spec = PipelineSpec.read(tiny_sd.model)
    ours = PromptTokenizer(spec.path(tiny_sd.model, "tokenizer"), spec.text_length, spec.pad_token_id)
    prompts = [*PROMPTS, LONG, "", "UPPER case, punctuation!?", "  spaces   between  "]
    want = oracle.tokenizer(
        prompts, padding="max_length", max_length=TEXT_LENGTH, truncation=True, return_tensors="np"
    ).input_ids
    assert spec.text_length == TEXT_LENGTH
    np.testing.assert_array_equal(ours(prompts), want)


def test_openvino_samples_within_a_psnr_bound_of_onnx_runtime(tiny_sd, sampler):
    """backend="openvino" (U-Net and VAE decoder; bf16 where native) against the exact fp32 ort-cpu images."""
    pytest.importorskip("openvino")
    kw = dict(steps=8, seeds=SEEDS, prompt=list(PROMPTS), negative_prompt=["", "a dog", ""], guidance=7.5)
    exact, _ = sampler.sample(3, **kw)
    with Sampler(tiny_sd.model, backend="openvino") as s:
        assert s.parts.decoder.part.name == "openvino"
        fast, records = s.sample(3, **kw)
    worst = min(psnr(a, b) for a, b in zip(exact, fast))
    print(f"openvino ({records[0]['precision']}) vs ort-cpu: worst PSNR {worst:.1f} dB")
    assert worst >= PSNR_DB


TORCH_FREE = """
import sys
sys.modules.update(torch=None, transformers=None, diffusers=None)  # any import of them now fails
from ddengine import Sampler
images, records = Sampler(sys.argv[1], backend="ort-cpu").sample(2, steps=3, prompt=["a cat", "a dog"], guidance=7.5)
print(images.shape, records[1]["prompt"])
"""


def test_sampling_a_model_dir_needs_neither_torch_nor_transformers(tiny_sd):
    proc = subprocess.run(
        [sys.executable, "-c", TORCH_FREE, str(tiny_sd.model)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["(2,", f"{IMAGE},", f"{IMAGE},", "3)", "a", "dog"]


RSS_PROBE = """
import json, sys
from ddengine.model.load import load_model
def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak to what is resident now (the imports' transient peak is not the load's)
before = status("VmRSS")
load_model(sys.argv[1])
print(json.dumps({"before": before, "after": status("VmHWM")}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the resident set from /proc")
def test_loading_a_large_single_file_model_reads_it_into_memory_once(tmp_path):
    """300 MB of weights in one .onnx: load_model's peak RSS grows by less than 1.6x the file (a second copy of the
    file, or of its weights, would be 2x). The peak is the process's VmHWM: getrusage's ru_maxrss would include the
    resident set of pytest itself, which Linux carries into a forked and exec'd child."""
    import onnx
    from onnx import numpy_helper

    from tests.support.tiny_models import build_tiny_model

    path = tmp_path / "large.onnx"
    build_tiny_model(path)
    model = onnx.load(str(path))
    rng = np.random.default_rng(0)
    sizes = [64 << 20, 1 << 20, *[(235 << 20) // 40] * 40]  # one 64 MB table, a 1 MB one, forty of about 6 MB
    for i, size in enumerate(sizes):
        model.graph.initializer.append(
            numpy_helper.from_array(rng.standard_normal(size // 4, dtype=np.float32), f"w{i}")
        )
    onnx.save(model, str(path))
    del model
    size = path.stat().st_size
    assert size > 295 << 20
    proc = subprocess.run([sys.executable, "-c", RSS_PROBE, str(path)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rss = json.loads(proc.stdout)
    grown = rss["after"] - rss["before"]
    print(f"load_model of {size / 2**20:.0f} MB: peak RSS +{grown / 2**20:.0f} MB ({grown / size:.2f}x)")
    assert grown < 1.6 * size


def test_a_weight_shorter_than_its_shape_is_refused(tmp_path):
    """The loader reads large initializers without their bytes, so it checks their length against the shape itself."""
    import onnx
    from onnx import numpy_helper

    from ddengine.model.load import ModelError, load_model
    from tests.support.tiny_models import build_tiny_model

    path = tmp_path / "short.onnx"
    build_tiny_model(path)
    model = onnx.load(str(path))
    tensor = numpy_helper.from_array(np.zeros(1 << 18, np.float32), "w")
    tensor.raw_data = tensor.raw_data[:-4]
    model.graph.initializer.append(tensor)
    onnx.save(model, str(path))
    with pytest.raises(
        ModelError, match=r"tensor 'w' has 1048572 bytes of raw data; its shape \[262144\] and type FLOAT need 1048576"
    ):
        load_model(path)


def test_a_missing_external_data_file_is_named(tmp_path):
    """The checker sees external tensors as inputs (their bytes are not read), so the loader checks the files itself."""
    import onnx

    from ddengine.model.load import ModelError, load_model
    from tests.support.tiny_models import build_tiny_model

    path = tmp_path / "ext.onnx"
    build_tiny_model(path)
    onnx.save(onnx.load(str(path)), str(path), save_as_external_data=True, location="ext.weights", size_threshold=0)
    assert load_model(path).sha256
    (tmp_path / "ext.weights").unlink()
    with pytest.raises(
        ModelError, match=f"model file {path}: its external data file ext.weights is missing from {tmp_path}"
    ):
        load_model(path)
