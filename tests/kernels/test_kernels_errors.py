"""Bad input to ddengine._kernels raises a clear error naming expected and given values, and changes nothing."""
import numpy as np
import pytest

from ddengine import _kernels

B = 8
ROW = [0.9, 0.1, 0.2, 0.3, 0.1, 0.5, 0.4, 0.2, 0.3]


def good():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((B, 3, 5)).astype(np.float32)
    return dict(x=x, model_out=rng.standard_normal((B, 3, 5)).astype(np.float32), row=list(ROW),
                seeds=np.arange(B, dtype=np.uint64), step_index=3)


def read_only(a):
    a.flags.writeable = False
    return a


def with_nan_row(a):
    a[4] = np.nan
    return a


CASES = [
    ("x", lambda a: a.astype(np.float64), TypeError, "x must be float32, got float64"),
    ("x", lambda a: a.tolist(), TypeError, "x must be a float32 array .*got list"),
    ("x", lambda a: a.astype(">f4"), TypeError, "x must be float32, got a big-endian type"),
    ("x", lambda a: np.asfortranarray(a), ValueError, "x must be C-contiguous"),
    ("x", read_only, ValueError, "x must be writable, got a read-only array"),
    ("model_out", lambda a: a.astype(np.float16), TypeError, "model_out must be float32, got float16"),
    ("model_out", lambda a: a[:, :, ::-1], ValueError, "model_out must be C-contiguous"),
    ("model_out", lambda a: a[:7], ValueError, r"model_out must have shape \(8, 3, 5\).*got \(7, 3, 5\)"),
    ("model_out", lambda a: a.reshape(B, 15), ValueError, r"model_out must have shape \(8, 3, 5\).*got \(8, 15\)"),
    ("seeds", lambda a: a[:7], ValueError, r"seeds must have B=8 entries \(one per image\), got 7"),
    ("seeds", lambda a: a.astype(np.int64), TypeError, "seeds must be uint64, got int64"),
    ("seeds", lambda a: a.astype(np.uint32), TypeError, "seeds must be uint64, got uint32"),
    ("seeds", lambda a: [0] * B, TypeError, "seeds must be a uint64 array .*got list"),
    ("row", lambda a: a[:8], ValueError, "row must have 9 values .*got 8"),
    ("row", lambda a: np.array(a)[:8], ValueError, "row must be 9 float32/float64 values"),
    ("row", lambda a: a[:8] + [float("inf")], ValueError, r"row\[8\] must be finite in float32, got inf"),
    ("row", lambda a: with_nan_row(np.array(a)), ValueError, r"row\[4\] must be finite in float32, got nan"),
    ("row", lambda a: a[:8] + [1e39], ValueError, r"row\[8\] must be finite in float32"),
    ("row", lambda a: a[:8] + ["x"], TypeError, r"row\[8\] must be a float, got str"),
    ("step_index", lambda a: -1, ValueError, r"step_index must be an int in \[0, 2\*\*32\), got -1"),
    ("step_index", lambda a: 2**32, ValueError, r"step_index must be an int in \[0, 2\*\*32\), got 4294967296"),
    ("step_index", lambda a: 1.5, TypeError, "step_index must be an int .*got float"),
]


def assert_unchanged_after(args, kwargs, exc, match):
    before = args["x"].copy() if isinstance(args["x"], np.ndarray) else None
    with pytest.raises(exc, match=match):
        _kernels.step(*args.values(), **kwargs)
    if before is not None:
        np.testing.assert_array_equal(args["x"], before)


@pytest.mark.parametrize("name, bad, exc, match", CASES)
def test_bad_positional_argument(name, bad, exc, match):
    args = good()
    args[name] = bad(args[name])
    assert_unchanged_after(args, {}, exc, match)


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(guidance=float("nan")), ValueError, "guidance must be a finite float or None, got nan"),
    (dict(guidance=float("inf")), ValueError, "guidance must be a finite float or None, got inf"),
    (dict(guidance="7"), TypeError, "guidance must be a float or None, got str"),
    (dict(guidance=7.5), ValueError, r"model_out must have shape \(16, 3, 5\) \(2B = \[unconditional; conditional\]"),
    (dict(clip=0.0), ValueError, r"clip must be a finite float > 0 or None, got 0.0"),
    (dict(clip=-1.0), ValueError, r"clip must be a finite float > 0 or None, got -1.0"),
    (dict(clip=float("nan")), ValueError, "clip must be a finite float > 0 or None, got nan"),
    (dict(threads=-1), ValueError, r"threads must be an int in \[0, 2\*\*31\) \(0 = all cores\), got -1"),
    (dict(threads=1.0), TypeError, "threads must be an int"),
])
def test_bad_keyword_argument(kwargs, exc, match):
    assert_unchanged_after(good(), kwargs, exc, match)


def test_keywords_are_keyword_only():
    args = good()
    with pytest.raises(TypeError):
        _kernels.step(*args.values(), None)


def test_unguided_model_out_of_doubled_batch_is_rejected():
    args = good()
    args["model_out"] = np.concatenate([args["model_out"]] * 2)
    assert_unchanged_after(args, {}, ValueError, r"model_out must have shape \(8, 3, 5\) \(same as x")


def test_model_out_sharing_memory_with_x_is_rejected():
    args = good()
    args["model_out"] = args["x"]
    assert_unchanged_after(args, {}, ValueError, "model_out must not share memory with x")


def test_zero_dim_x_is_rejected():
    with pytest.raises(ValueError, match="x must be an array with ndim >= 1, got a 0-d array"):
        _kernels.step(np.float32(1.0), np.float32(1.0), ROW, np.zeros(1, np.uint64), 0)


@pytest.mark.parametrize("out, seeds, exc, match", [
    (np.zeros((2, 3)), np.zeros(2, np.uint64), TypeError, "out must be float32, got float64"),
    (read_only(np.zeros((2, 3), np.float32)), np.zeros(2, np.uint64), ValueError, "out must be writable"),
    (np.zeros((2, 3), np.float32), np.zeros(3, np.uint64), ValueError, "seeds must have B=2 entries"),
    (np.zeros((2, 3), np.float32), np.zeros(2, np.int32), TypeError, "seeds must be uint64, got int32"),
])
def test_fill_noise_bad_input(out, seeds, exc, match):
    before = out.copy()
    with pytest.raises(exc, match=match):
        _kernels.fill_noise(out, seeds)
    np.testing.assert_array_equal(out, before)
