"""FID and accuracy in numpy against a float64 scipy.linalg.sqrtm oracle."""

import numpy as np
import pytest
from scipy import linalg

from ddengine.quality import metrics


def oracle_fid(a, b):
    """Heusel et al. (2017) with scipy's matrix square root, as pytorch-fid computes it."""
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_identical_sets_have_zero_fid():
    a = np.random.default_rng(0).standard_normal((500, 16))
    assert abs(metrics.fid(a, a)) < 1e-9


@pytest.mark.parametrize("dim", [2, 16, 64])
def test_matches_scipy_sqrtm_oracle_on_gaussians(dim):
    rng = np.random.default_rng(dim)
    mix = rng.standard_normal((dim, dim))
    a = rng.standard_normal((2000, dim)) @ mix
    b = rng.standard_normal((1500, dim)) @ (mix + 0.3 * rng.standard_normal((dim, dim))) + 0.5
    want = oracle_fid(a, b)
    assert want > 0.1
    assert metrics.fid(a, b) == pytest.approx(want, rel=1e-7)


def test_closed_form_for_diagonal_gaussians():
    # FID(N(0, diag(s1)), N(m, diag(s2))) = |m|^2 + sum (sqrt(s1) - sqrt(s2))^2
    s1, s2, m = np.array([1.0, 4.0]), np.array([9.0, 1.0]), np.array([1.0, -2.0])
    want = (m**2).sum() + ((np.sqrt(s1) - np.sqrt(s2)) ** 2).sum()
    assert metrics.frechet_distance(np.zeros(2), np.diag(s1), m, np.diag(s2)) == pytest.approx(want, rel=1e-12)


def test_bad_shapes_are_errors():
    with pytest.raises(ValueError, match="N >= 2"):
        metrics.fid(np.zeros((1, 3)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="mismatched"):
        metrics.fid(np.ones((4, 3)), np.ones((4, 2)))


def test_accuracy():
    assert metrics.accuracy([1, 2, 3, 4], [1, 2, 0, 4]) == 0.75
    with pytest.raises(ValueError, match="equal, non-empty"):
        metrics.accuracy([1, 2], [1, 2, 3])


def test_psnr_per_image_and_of_identical_images():
    a = np.zeros((3, 4, 4, 1), np.uint8)
    b = a.copy()
    b[1] += 16  # every value off by 16: MSE 256
    b[2, 0, 0] = 255  # one value in 16 off by 255: MSE 255^2 / 16
    db = metrics.psnr(a, b, per_image=True)
    assert (
        db[0] == np.inf
        and db[1] == pytest.approx(20 * np.log10(255 / 16))
        and db[2] == pytest.approx(10 * np.log10(16))
    )
    assert metrics.psnr(a[:1], a[:1]) == np.inf
