"""Scoring reconstructions against the true batch — the only code that holds both.

Reconstructions come in no particular order, so they are first matched one-to-one to the true
images with the Hungarian algorithm (``scipy.optimize.linear_sum_assignment`` on the pairwise MSE),
as breaching's analysis step does; then PSNR and SSIM (scikit-image, images in [0, 1]) are computed
per matched pair. Label accuracy compares the recovered labels with the true ones as multisets
(label recovery does not say which image carries which label).
"""

from __future__ import annotations

import warnings
from collections import Counter

import numpy as np


def match(true: np.ndarray, rec: np.ndarray) -> np.ndarray:
    """Index into ``rec`` for each true image (B,), minimising the total MSE (Hungarian)."""
    from scipy.optimize import linear_sum_assignment  # scipy, scikit-image: imported when scoring (seconds)

    t = true.reshape(len(true), -1).astype(np.float64)
    r = rec.reshape(len(rec), -1).astype(np.float64)
    # |t - r|² = |t|² + |r|² - 2 t.r: memory of the (B, R) table only (imprint returns thousands of candidates)
    cost = np.maximum((t ** 2).sum(1)[:, None] + (r ** 2).sum(1)[None, :] - 2.0 * t @ r.T, 0.0) / t.shape[1]
    rows, cols = linear_sum_assignment(cost)
    order = np.full(len(true), -1, dtype=np.int64)
    order[rows] = cols
    return order


PSNR_CAP = 100.0  # dB; an exact recovery (MSE 0) is reported as 100 dB so that JSON stays finite


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    from skimage.metrics import peak_signal_noise_ratio

    if np.array_equal(a, b):
        return PSNR_CAP
    return min(PSNR_CAP, float(peak_signal_noise_ratio(a.astype(np.float64), b.astype(np.float64), data_range=1.0)))


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """SSIM of two (C, H, W) images in [0, 1] (scikit-image, Gaussian-free 7x7 window, channel mean)."""
    from skimage.metrics import structural_similarity

    h, w = a.shape[-2:]
    win = min(7, h, w)
    win -= 1 - win % 2  # odd
    return float(structural_similarity(a.astype(np.float64), b.astype(np.float64), data_range=1.0,
                                       channel_axis=0, win_size=win))


def label_accuracy(true: np.ndarray, rec: np.ndarray | None) -> float | None:
    """Fraction of the true labels recovered, as multisets; None when no labels were recovered."""
    if rec is None:
        return None
    overlap = Counter(np.asarray(true).tolist()) & Counter(np.asarray(rec).tolist())
    return sum(overlap.values()) / max(len(true), 1)


def score(true_images: np.ndarray, rec_images: np.ndarray, true_labels: np.ndarray,
          rec_labels: np.ndarray | None, labels_given: bool = False) -> dict:
    """Match, then score. Images: (B, C, H, W) in [0, 1]. ``rec_images`` may hold more or fewer
    images than the truth; every true image is matched to at most one reconstruction."""
    true_images = np.clip(np.asarray(true_images, dtype=np.float64), 0, 1)
    rec_images = np.clip(np.asarray(rec_images, dtype=np.float64), 0, 1)
    order = match(true_images, rec_images)
    matched = [(i, int(j)) for i, j in enumerate(order) if j >= 0]
    p = [psnr(true_images[i], rec_images[j]) for i, j in matched]
    s = [ssim(true_images[i], rec_images[j]) for i, j in matched]
    return {
        "psnr": p,
        "ssim": s,
        "psnr_mean": float(np.mean(p)) if p else None,
        "ssim_mean": float(np.mean(s)) if s else None,
        "label_accuracy": None if labels_given else label_accuracy(true_labels, rec_labels),
        "order": order.tolist(),
    }


# --------------------------------------------------------------------------- model inversion

def nearest(features: np.ndarray, references: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each row of ``features``, the smallest squared L2 distance to a row of ``references`` and its
    index (the KNN distance of the model-inversion literature: GMI, KEDMI, the MI toolbox)."""
    f = np.asarray(features, dtype=np.float64)
    r = np.asarray(references, dtype=np.float64)
    d2 = (f * f).sum(1)[:, None] - 2 * f @ r.T + (r * r).sum(1)[None, :]
    idx = d2.argmin(1)
    return np.maximum(d2[np.arange(len(f)), idx], 0.0), idx


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two sets of feature vectors (FID's formula,
    ||μa − μb||² + Tr(Σa + Σb − 2 (Σa Σb)^½)); which network made the features is the caller's to say."""
    from scipy.linalg import sqrtm  # scipy: imported when scoring (seconds)

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a = np.atleast_2d(np.cov(a, rowvar=False)) if len(a) > 1 else np.zeros((a.shape[1], a.shape[1]))
    cov_b = np.atleast_2d(np.cov(b, rowvar=False)) if len(b) > 1 else np.zeros((b.shape[1], b.shape[1]))
    with warnings.catch_warnings():  # few samples in many dimensions: a singular product is expected
        warnings.simplefilter("ignore")
        root = sqrtm(cov_a @ cov_b)
    if np.iscomplexobj(root):
        root = root.real  # numerical imaginary parts of a nearly singular product
    return float(max(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * root), 0.0))
