"""The fused step of ddengine.kernels._step against the float64 numpy reference (engine/core/reference.py), image by image."""

import numpy as np
import pytest

from ddengine.kernels import _step
from ddengine.kernels.host import IMAGE_DTYPE, STAYED_FINITE, image_records
from tests.support.kernel_oracle import oracle_step, random_step_case, rel_err

PER_IMAGE_SHAPES = [(1,), (3,), (37,), (5, 7, 3), (2053,)]  # 2053 = one 2048-element block + a partial quad


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("clip", [0.0, 1.0])
def test_step_matches_float64_reference_per_image(threads, clip):
    rng = np.random.default_rng([threads, clip == 0])
    for batch in range(1, 14):
        for shape in PER_IMAGE_SHAPES:
            x, model_out, table, images = random_step_case(rng, batch, shape, clip=clip)
            ref = oracle_step(x, model_out, table, images)
            _step.step(x, model_out, table, images, threads=threads)
            assert rel_err(x, ref) < 1e-6, (batch, shape)
            assert (images["nonfinite_step"] == STAYED_FINITE).all()


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("clip", [0.0, 1.0])
def test_multistep_rows_match_float64_reference_and_update_the_slots(threads, clip):
    rng = np.random.default_rng([threads, clip == 0, 7])
    for batch in (1, 4, 9):
        for shape in PER_IMAGE_SHAPES:
            x, model_out, table, images, slots = random_step_case(
                rng, batch, shape, tables=6, clip=clip, multistep=True
            )
            ref, ref_slots = oracle_step(x, model_out, table, images, slots)
            x0 = np.empty_like(x)
            _step.step(x, model_out, table, images, slots=slots, x0_out=x0, threads=threads)
            assert rel_err(x, ref) < 1e-6, (batch, shape)
            assert rel_err(slots, ref_slots) < 1e-6, (batch, shape)


def test_x0_out_receives_the_clipped_prediction():
    rng = np.random.default_rng(12)
    x, model_out, table, images = random_step_case(rng, 3, (40,), guided_share=0.0, clip=0.5)
    x0 = np.full_like(x, np.nan)
    want = np.stack(
        [np.clip(table[r, 0] * x[j] + table[r, 1] * model_out[j], -0.5, 0.5) for j, r in enumerate(images["row"])]
    )
    _step.step(x.copy(), model_out, table, images, x0_out=x0)
    assert rel_err(x0, want) < 1e-6


def test_a_multistep_row_without_slots_is_refused():
    rng = np.random.default_rng(13)
    x, model_out, table, images, _ = random_step_case(rng, 2, (8,), multistep=True)
    images["row"] = 1
    with pytest.raises(ValueError, match="needs slots"):
        _step.step(x, model_out, table, images)


@pytest.mark.parametrize("clip", [0.0, 0.5])
def test_multithreaded_large_batch_matches_reference_and_one_thread(clip):
    rng = np.random.default_rng(5)
    x, model_out, table, images = random_step_case(rng, 5, (3, 61, 67), clip=clip)  # > the parallel threshold
    ref = oracle_step(x, model_out, table, images)
    one = x.copy()
    _step.step(one, model_out, table, images.copy(), threads=1)
    for _ in range(3):  # the persistent pool serves call after call
        y = x.copy()
        _step.step(y, model_out, table, images.copy(), threads=2)
        assert np.array_equal(y, one)
    assert rel_err(one, ref) < 1e-6


def test_each_image_is_independent_of_the_rest_of_its_batch():
    rng = np.random.default_rng(8)
    x, model_out, table, images = random_step_case(rng, 9, (3, 40, 40), clip=1.0)
    together = x.copy()
    _step.step(together, model_out, table, images.copy(), threads=2)
    for j in range(9):
        alone_out = [model_out[j]] + ([model_out[images["uncond"][j]]] if images["uncond"][j] >= 0 else [])
        alone_images = images[j : j + 1].copy()
        alone_images["uncond"] = 1 if images["uncond"][j] >= 0 else -1
        alone = x[j : j + 1].copy()
        _step.step(alone, np.stack(alone_out), table, alone_images, threads=1)
        assert np.array_equal(alone[0], together[j])


def test_first_non_finite_step_is_recorded_per_image():
    rng = np.random.default_rng(9)
    x, model_out, table, images = random_step_case(rng, 4, (50,), guided_share=1.0)
    images["step"] = 7
    model_out[1, 3] = np.nan  # image 1's conditional output
    model_out[4 + 2, 0] = np.inf  # image 2's unconditional output
    x[3, 5] = 3e38  # image 3 overflows inside the update
    table[:, 5] = 2.0
    _step.step(x, model_out, table, images)
    assert images["nonfinite_step"].tolist() == [-1, 7, 7, 7]
    images["step"] = 8
    _step.step(x, model_out, table, images)
    assert images["nonfinite_step"].tolist()[1:] == [7, 7, 7]  # the first failing step is kept


def test_sigma_zero_adds_no_noise():
    rng = np.random.default_rng(6)
    x, model_out, table, images = random_step_case(rng, 4, (9, 9), guided_share=0.0, sigma=0.0)
    ref = oracle_step(x, model_out, table, images)
    images["step"] = 0
    _step.step(x, model_out, table, images)
    assert rel_err(x, ref) < 1e-6


def test_records_match_the_compiled_layout():
    layout = _step.layout()
    assert layout["dd_image"]["size"] == IMAGE_DTYPE.itemsize
    for field in ("seed", "row", "step", "uncond", "guidance", "nonfinite_step", "noise_scale"):
        assert IMAGE_DTYPE.fields[field][1] == layout["dd_image"][field], field
    from ddengine.kernels.host import StepArgs

    assert layout["dd_step_args"]["size"] == __import__("ctypes").sizeof(StepArgs)
    for field in ("x", "model_out", "table", "images", "slots", "x0_out", "batch", "per_image"):
        assert getattr(StepArgs, field).offset == layout["dd_step_args"][field], field


def test_image_records_start_clean():
    images = image_records(np.array([5, 6], np.uint64), row=3, uncond=[2, -1], guidance=[1.5, 0.0])
    assert images["row"].tolist() == [3, 3] and images["step"].tolist() == [0, 0]
    assert images["uncond"].tolist() == [2, -1] and images["nonfinite_step"].tolist() == [-1, -1]
