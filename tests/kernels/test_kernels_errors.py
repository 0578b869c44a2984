"""ddengine.kernels._step refuses what would make it read or write outside its buffers, with a clear error, changing nothing.

Everything else a launch assumes (finite rows, guidance, clip) is validated once where plans and requests are made.
"""

import numpy as np
import pytest

from ddengine.core.rows import NUM_COLUMNS, SIGMA, WRITE_D
from ddengine.kernels import _step
from ddengine.kernels.host import image_records

B = 8


def good():
    rng = np.random.default_rng(0)
    images = image_records(np.arange(B, dtype=np.uint64), uncond=[B, -1, B + 1, -1, -1, -1, -1, -1], guidance=2.0)
    return dict(
        x=rng.standard_normal((B, 3, 5)).astype(np.float32),
        model_out=rng.standard_normal((B + 2, 3, 5)).astype(np.float32),
        table=single_step_table(rng),
        images=images,
    )


def single_step_table(rng):
    table = np.zeros((4, NUM_COLUMNS), dtype=np.float32)
    table[:, : SIGMA + 1] = rng.standard_normal((4, SIGMA + 1))
    table[:, WRITE_D] = -1.0
    return table


def read_only(a):
    a.flags.writeable = False
    return a


def with_row(images, row):
    images = images.copy()
    images["row"][3] = row
    return images


def with_uncond(images, uncond):
    images = images.copy()
    images["uncond"][5] = uncond
    return images


CASES = [
    ("x", lambda a: a.astype(np.float64), TypeError, "x must be a C-contiguous array of 4-byte float items"),
    ("x", lambda a: a.tolist(), TypeError, "x must be a writable contiguous array, got list"),
    ("x", lambda a: a.astype(">f4"), TypeError, "x must be a C-contiguous array of 4-byte float items.*format >f"),
    ("x", lambda a: np.asfortranarray(a), TypeError, "x must be a C-contiguous array"),
    ("x", read_only, TypeError, "x must be a writable contiguous array"),
    ("model_out", lambda a: a.astype(np.float16), TypeError, "model_out must be a C-contiguous array of 4-byte float"),
    ("model_out", lambda a: a[:, :, ::-1], TypeError, "model_out must be a C-contiguous array"),
    ("model_out", lambda a: a[:7], ValueError, "model_out must have at least as many rows as x"),
    ("model_out", lambda a: a.reshape(-1)[:-1], ValueError, "model_out must be whole rows of x's per-image size"),
    ("table", lambda a: a.reshape(-1)[:-1], ValueError, "table must be rows of 25 coefficients"),
    ("table", lambda a: a.astype(np.float64), TypeError, "table must be a C-contiguous array of 4-byte float"),
    ("images", lambda a: a[:7], ValueError, "images must hold one record per image of x"),
    ("images", lambda a: np.zeros(B, np.uint64), TypeError, "images must be a C-contiguous array of 32-byte record"),
    ("images", lambda a: read_only(a.copy()), TypeError, "images must be a writable contiguous array"),
    ("images", lambda a: with_row(a, 4), IndexError, r"images\[3\].row = 4 is outside the table's 4 rows"),
    ("images", lambda a: with_row(a, -1), IndexError, r"images\[3\].row = -1 is outside the table's 4 rows"),
    ("images", lambda a: with_uncond(a, 10), IndexError, r"images\[5\].uncond = 10 is outside model_out's 10 rows"),
    ("images", lambda a: with_uncond(a, -2), IndexError, r"images\[5\].uncond = -2 is outside model_out's 10 rows"),
]


def assert_unchanged_after(args, kwargs, exc, match):
    before = args["x"].copy() if isinstance(args["x"], np.ndarray) else None
    with pytest.raises(exc, match=match):
        _step.step(*args.values(), **kwargs)
    if before is not None:
        np.testing.assert_array_equal(args["x"], before)


@pytest.mark.parametrize("name, bad, exc, match", CASES)
def test_bad_positional_argument(name, bad, exc, match):
    args = good()
    args[name] = bad(args[name])
    assert_unchanged_after(args, {}, exc, match)


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(threads=-1), ValueError, r"threads must be >= 0 \(0 = all cores\), got -1"),
        (dict(threads=1.0), TypeError, "integer"),
        (dict(slots=np.zeros((B, 3, 3, 5), np.float32)), ValueError, "slots has the wrong size"),
        (dict(x0_out=np.zeros((B, 3, 4), np.float32)), ValueError, "x0_out has the wrong size"),
        (
            dict(slots=np.zeros((B, 4, 3, 5), np.float64)),
            TypeError,
            "slots must be a C-contiguous array of 4-byte float",
        ),
    ],
)
def test_bad_keyword_argument(kwargs, exc, match):
    assert_unchanged_after(good(), kwargs, exc, match)


def test_keywords_are_keyword_only():
    with pytest.raises(TypeError):
        _step.step(*good().values(), 1.0)


def test_model_out_sharing_memory_with_x_is_rejected():
    args = good()
    args["model_out"] = args["x"]
    assert_unchanged_after(args, {}, ValueError, "model_out must not share memory with x")


def test_zero_dim_x_is_rejected():
    args = good()
    args["x"] = np.zeros((), np.float32)
    with pytest.raises(TypeError, match=r"\(ndim >= 1\), got .*ndim 0"):
        _step.step(*args.values())


def test_huge_thread_counts_run_on_the_cores_there_are():
    args, ref = good(), good()
    _step.step(*ref.values(), threads=1)
    _step.step(*args.values(), threads=100000)
    assert np.array_equal(args["x"], ref["x"])


@pytest.mark.parametrize(
    "out, seeds, exc, match",
    [
        (np.zeros((2, 3)), np.zeros(2, np.uint64), TypeError, "out must be a C-contiguous array of 4-byte float"),
        (read_only(np.zeros((2, 3), np.float32)), np.zeros(2, np.uint64), TypeError, "out must be a writable"),
        (np.zeros((2, 3), np.float32), np.zeros(3, np.uint64), ValueError, "seeds must have B=2 entries"),
        (
            np.zeros((2, 3), np.float32),
            np.zeros(2, np.int64),
            TypeError,
            "seeds must be a C-contiguous array of 8-byte uint",
        ),
    ],
)
def test_fill_noise_bad_input(out, seeds, exc, match):
    before = out.copy()
    with pytest.raises(exc, match=match):
        _step.fill_noise(out, seeds)
    np.testing.assert_array_equal(out, before)
