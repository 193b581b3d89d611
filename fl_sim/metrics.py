"""Scoring reconstructions against the true batch — the only code that holds both.

Reconstructions come in no particular order, so they are first matched one-to-one to the true
images with the Hungarian algorithm (``scipy.optimize.linear_sum_assignment`` on the pairwise MSE),
as breaching's analysis step does; then PSNR and SSIM (scikit-image, images in [0, 1]) are computed
per matched pair. Label accuracy compares the recovered labels with the true ones as multisets
(label recovery does not say which image carries which label).
"""

from __future__ import annotations

from collections import Counter

import numpy as np


def match(true: np.ndarray, rec: np.ndarray) -> np.ndarray:
    """Index into ``rec`` for each true image (B,), minimising the total MSE (Hungarian)."""
    from scipy.optimize import linear_sum_assignment  # scipy, scikit-image: imported when scoring (seconds)

    t = true.reshape(len(true), -1).astype(np.float64)
    r = rec.reshape(len(rec), -1).astype(np.float64)
    cost = ((t[:, None, :] - r[None, :, :]) ** 2).mean(-1)
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
