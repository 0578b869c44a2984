"""Every solver end to end on a foreign diffusers UNet2DModel, the ort-cpu path against diffusers' own loop (the
oracle): the torch U-Net and the diffusers scheduler of the method, started from the engine's initial noise
(x_T = noise_scale * Philox normals) and, for euler-a, given the engine's step noise. At most 1 uint8 level apart."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from diffusers.schedulers import scheduling_euler_ancestral_discrete  # noqa: E402

from ddengine.core.solvers import SOLVERS  # noqa: E402
from ddengine.export.diffusers_export import export_diffusers  # noqa: E402
from ddengine.runtime.sampler import Sampler, to_uint8  # noqa: E402
from tests.export.test_export_diffusers import SCHEDULER, save_tiny  # noqa: E402
from tests.support.kernel_oracle import batch_noise  # noqa: E402

SEEDS = [11, 2**40 + 3]
CLASSES = [1, 3]
EXTRA = {"dpmpp-2m": {"solver_order": 2}, "dpmpp-3m": {"solver_order": 3}, "plms": {"skip_prk_steps": True}}


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("unet2d")
    unet = save_tiny(folder)
    export_diffusers(folder, folder / "m.onnx")
    return unet.eval(), folder / "m.onnx"


def diffusers_images(unet, method, steps, shape, monkeypatch):
    keys = {k: v for k, v in SCHEDULER.items() if k not in ("_class_name", "clip_sample")}
    sched = getattr(diffusers, SOLVERS[method][0])(**keys, **EXTRA.get(method, {}))
    sched.set_timesteps(steps)
    draws = iter(range(10**6))
    monkeypatch.setattr(
        scheduling_euler_ancestral_discrete,
        "randn_tensor",
        lambda shape, **kw: torch.from_numpy(batch_noise(SEEDS, shape, next(draws), 0).astype(np.float32)),
    )
    z = batch_noise(SEEDS, (len(SEEDS), *shape), 0, 1).astype(np.float32)  # the engine's x_T normals
    latents = torch.from_numpy(z) * sched.init_noise_sigma
    labels = torch.tensor(CLASSES)
    with torch.no_grad():
        for t in sched.timesteps:
            out = unet(sched.scale_model_input(latents, t), t, class_labels=labels).sample
            latents = sched.step(out, t, latents).prev_sample
    return to_uint8(latents.numpy())


@pytest.mark.parametrize("method", sorted(SOLVERS))
def test_solver_matches_diffusers_pipeline_loop(model, method, monkeypatch):
    unet, onnx_path = model
    steps = 8
    with Sampler(onnx_path, backend="ort-cpu") as sampler:
        images, records = sampler.sample(len(SEEDS), steps=steps, method=method, seeds=SEEDS, classes=CLASSES)
        shape = sampler.spec.image_shape
    assert all(r["status"] == "ok" and r["method"] == method for r in records)
    want = diffusers_images(unet, method, steps, shape, monkeypatch)
    assert np.abs(images.astype(int) - want.astype(int)).max() <= 1
