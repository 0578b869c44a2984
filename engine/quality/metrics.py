"""Quality metrics in numpy: Frechet distance between feature sets (FID, Heusel et al. 2017), accuracy, PSNR."""

import numpy as np


def feature_stats(features):
    """Mean and (unbiased) covariance of an (N, D) feature array, in float64."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must be (N, D) with N >= 2, got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _sqrt_psd(s):
    """Symmetric PSD square root via eigh (negative round-off eigenvalues clipped to 0)."""
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1-mu2||^2 + tr(S1 + S2 - 2 (S1 S2)^1/2); tr((S1 S2)^1/2) = sum sqrt(eig(S1^1/2 S2 S1^1/2))."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.size, mu1.size):
        raise ValueError(
            f"mismatched statistics: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}"
        )
    root = _sqrt_psd(sigma1)
    eig = np.linalg.eigvalsh(root @ sigma2 @ root)
    tr_covmean = float(np.sqrt(np.clip(eig, 0, None)).sum())
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)


def fid(features_a, features_b):
    """FID between two (N, D) feature sets."""
    return frechet_distance(*feature_stats(features_a), *feature_stats(features_b))


def accuracy(predicted, wanted):
    """Share of predictions equal to the wanted labels."""
    predicted, wanted = np.asarray(predicted), np.asarray(wanted)
    if predicted.shape != wanted.shape or predicted.size == 0:
        raise ValueError(f"predicted {predicted.shape} and wanted {wanted.shape} must be equal, non-empty shapes")
    return float(np.mean(predicted == wanted))


def psnr(a, b, peak=255.0, per_image=False):
    """Peak signal-to-noise ratio in dB, 10 log10(peak^2 / MSE) (inf when equal): over everything, or per image."""
    d = (np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2
    mse = d.reshape(len(d), -1).mean(axis=1) if per_image else d.mean()
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(peak**2 / mse)
