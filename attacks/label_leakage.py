"""Label leakage from cut-layer gradients — Li et al., "Label Leakage and Protection in Two-party Split
Learning" (ICLR 2022).

When the labels stay with the client (U-shaped split learning), the server still receives, for every
example, the gradient of the loss with respect to what it sent. With cross-entropy that gradient is
``Wᵀ(softmax - onehot(y))`` through the client's head: examples of one class point the same way.
*Direction scoring* groups the per-example gradients by cosine similarity (k-means on unit vectors,
one cluster per class); *norm scoring* (their §3.1, binary tasks) ranks them by norm. The server learns
the classes up to a renaming; ``label_accuracy_up_to_renaming`` scores that with the best one-to-one
renaming (Hungarian matching).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment


def direction_scoring(cut_gradients: torch.Tensor, num_classes: int, seed: int = 0) -> np.ndarray:
    """Cluster ids (0..num_classes-1) of the per-example gradients by direction."""
    from sklearn.cluster import KMeans  # imported when used: scikit-learn takes a second to import

    g = cut_gradients.detach().cpu().flatten(1).double()  # scikit-learn runs on the CPU
    g = g / g.norm(dim=1, keepdim=True).clamp(min=1e-12)
    k = min(num_classes, len(g))
    return KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(g.numpy())


def norm_scoring(cut_gradients: torch.Tensor) -> np.ndarray:
    """Binary tasks: the larger-norm half is guessed to be the (rarer) positive class."""
    norms = cut_gradients.detach().flatten(1).norm(dim=1).cpu().numpy()
    return (norms > np.median(norms)).astype(int)


def label_accuracy_up_to_renaming(guess: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy of cluster ids against labels under the best one-to-one renaming of the clusters."""
    ks, cs = np.unique(guess), np.unique(labels)
    counts = np.array([[np.sum((guess == k) & (labels == c)) for c in cs] for k in ks])
    rows, cols = linear_sum_assignment(-counts)
    return float(counts[rows, cols].sum() / len(labels))
