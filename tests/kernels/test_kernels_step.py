"""The fused step of ddengine._kernels against the float64 numpy reference (engine/reference.py)."""
import numpy as np
import pytest

from ddengine import _kernels
from ddengine.reference import reference_step
from kernel_oracle import batch_noise, rel_err

PER_IMAGE_SHAPES = [(1,), (3,), (37,), (5, 7, 3), (2053,)]  # 2053 = one 2048-element block + a partial quad


def random_case(rng, batch, shape, guided, sigma=0.7):
    """x, model_out ((2B, ...) with guidance) and a float32 row with every coefficient in play."""
    x = rng.standard_normal((batch,) + shape).astype(np.float32)
    model_out = rng.standard_normal(((2 if guided else 1) * batch,) + shape).astype(np.float32)
    row = rng.uniform(-1.5, 1.5, 9).astype(np.float32)
    row[8] = sigma
    seeds = rng.integers(0, 2**64, batch, dtype=np.uint64)
    return x, model_out, row, seeds


def oracle(x, model_out, row, seeds, step, guidance, clip):
    z = batch_noise(seeds, x.shape, step=step, domain=0)
    return reference_step(x, model_out, row.astype(np.float64), z, guidance=guidance, clip=clip)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("guidance", [None, 7.5])
@pytest.mark.parametrize("clip", [None, 1.0])
def test_step_matches_float64_reference(threads, guidance, clip):
    rng = np.random.default_rng([threads, guidance is None, clip is None])
    for batch in range(1, 18):
        for shape in PER_IMAGE_SHAPES:
            x, model_out, row, seeds = random_case(rng, batch, shape, guidance is not None)
            step = int(rng.integers(0, 1000))
            ref = oracle(x, model_out, row, seeds, step, guidance, clip)
            _kernels.step(x, model_out, row, seeds, step, guidance=guidance, clip=clip, threads=threads)
            assert rel_err(x, ref) < 1e-6, (batch, shape)


@pytest.mark.parametrize("guidance, clip", [(None, None), (3.0, 0.5)])
def test_multithreaded_large_batch_matches_reference(guidance, clip):
    rng = np.random.default_rng(5)
    x, model_out, row, seeds = random_case(rng, 5, (3, 61, 67), guidance is not None)  # > parallel threshold
    ref = oracle(x, model_out, row, seeds, 3, guidance, clip)
    one = x.copy()
    _kernels.step(one, model_out, row, seeds, 3, guidance=guidance, clip=clip, threads=1)
    _kernels.step(x, model_out, row, seeds, 3, guidance=guidance, clip=clip, threads=2)
    assert np.array_equal(x, one)
    assert rel_err(x, ref) < 1e-6


def test_sigma_zero_adds_no_noise():
    rng = np.random.default_rng(6)
    x, model_out, row, seeds = random_case(rng, 4, (9, 9), False, sigma=0.0)
    ref = reference_step(x, model_out, row.astype(np.float64))
    _kernels.step(x, model_out, row, seeds, 0)
    assert rel_err(x, ref) < 1e-6


def test_clip_bounds_x0():
    # row: x0 = m, eps = 0, x' = x0: the step returns clip(m)
    model_out = np.array([[-3.0, -0.5, 0.0, 0.5, 3.0, np.nan]], np.float32)
    x = np.zeros_like(model_out)
    _kernels.step(x, model_out, [0, 1, 0, 0, 0, 1, 0, 0, 0], np.zeros(1, np.uint64), 0, clip=1.0)
    np.testing.assert_array_equal(x, [[-1.0, -0.5, 0.0, 0.5, 1.0, np.nan]])


def test_guidance_uses_unconditional_then_conditional_half():
    # row: x' = m = u + g (c - u)
    u = np.full((2, 3), 1.0, np.float32)
    c = np.full((2, 3), 3.0, np.float32)
    x = np.zeros((2, 3), np.float32)
    _kernels.step(x, np.concatenate([u, c]), [0, 0, 0, 1, 0, 0, 0, 1, 0], np.zeros(2, np.uint64), 0, guidance=2.0)
    np.testing.assert_array_equal(x, np.full((2, 3), 5.0))


@pytest.mark.parametrize("row", [
    [0.5, 0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.8, 0.9],
    (0.5, 0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.8, 0.9),
    np.array([0.5, 0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.8, 0.9]),
    np.array([0.5, 0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.8, 0.9], np.float32),
])
def test_row_accepts_sequences_and_buffers(row):
    x, model_out = np.ones((2, 5), np.float32), np.ones((2, 5), np.float32)
    seeds = np.array([1, 2], np.uint64)
    ref = oracle(x, model_out, np.asarray(row, np.float32), seeds, 4, None, None)
    assert _kernels.step(x, model_out, row, seeds, 4) is None
    assert rel_err(x, ref) < 1e-6


def test_empty_batch_is_a_no_op():
    x = np.zeros((0, 4), np.float32)
    _kernels.step(x, x.copy(), [1] * 9, np.zeros(0, np.uint64), 0)
    _kernels.fill_noise(x, np.zeros(0, np.uint64))


def test_concurrent_calls_from_python_threads_match_sequential():
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(8)
    cases = [random_case(rng, 3, (40000,), guided=True) for _ in range(4)]  # > parallel threshold each
    want = []
    for x, model_out, row, seeds in cases:
        y = x.copy()
        _kernels.step(y, model_out, row, seeds, 9, guidance=2.0, threads=1)
        want.append(y)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda c: _kernels.step(*c, 9, guidance=2.0, threads=2), cases))
    for (x, *_), y in zip(cases, want):
        assert np.array_equal(x, y)
