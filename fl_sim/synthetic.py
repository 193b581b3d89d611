"""FedProx's synthetic(alpha, beta) federated data (Li et al., "Federated Optimization in Heterogeneous
Networks", MLSys 2020, sec. 5.1; the same generator is LEAF's synthetic benchmark), generated from the
run's seed. Written from the paper's description:

- device k: its own model y = argmax(softmax(W_k x + b_k)), W_k ∈ R^{d×C} and b_k ∈ R^C drawn from
  N(u_k, 1), u_k ~ N(0, alpha) (alpha: how much the devices' models differ);
- its inputs x ~ N(v_k, Σ), v_k ~ N(B_k, 1) per feature, B_k ~ N(0, beta) (beta: how much their
  inputs differ), Σ diagonal with Σ_jj = j^-1.2;
- ``iid``: the paper's synthetic_iid, one W, b ~ N(0, 1) for every device and v_k = 0;
- its size: lognormal(size_mean, size_sigma) + min_size examples (the paper: lognormal(4, 2) + 50, a
  power law); 90% for training, the rest for the test split, as the paper's split.

Each device draws from its own stream (seed, k), so device k's data do not depend on how many devices
the run has. Examples are vectors of ``dimension`` features, shaped (dimension, 1, 1) like a 1x1 image
of ``dimension`` channels so that fl_sim's data path holds them; only ``model=mlp`` takes them."""

from __future__ import annotations

import numpy as np


def device(k: int, seed: int, *, alpha: float, beta: float, iid: bool, dimension: int, classes: int,
           size_mean: float, size_sigma: float, min_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Device ``k``'s examples (n, dimension) float32 and labels (n,) int64."""
    rng = np.random.default_rng([seed, 0x5E7, k])
    n = int(rng.lognormal(size_mean, size_sigma)) + int(min_size)
    scale = np.power(np.arange(1, dimension + 1, dtype=np.float64), -1.2) ** 0.5  # sqrt of Σ's diagonal
    if iid:
        g = np.random.default_rng([seed, 0x5E7, 0xFFFFFFFF])  # the one model every device shares
        w, b = g.normal(0.0, 1.0, (dimension, classes)), g.normal(0.0, 1.0, classes)
        v = np.zeros(dimension)
    else:
        u, big_b = rng.normal(0.0, alpha), rng.normal(0.0, beta)
        w, b = rng.normal(u, 1.0, (dimension, classes)), rng.normal(u, 1.0, classes)
        v = rng.normal(big_b, 1.0, dimension)
    x = v + rng.standard_normal((n, dimension)) * scale
    y = np.argmax(x @ w + b, axis=1)
    return x.astype(np.float32), y.astype(np.int64)


def generate(ds_cfg, num_devices: int, seed: int):
    """Every device's data: (x_train, y_train, owner of each training example, x_test, y_test), examples
    shaped (n, dimension, 1, 1)."""
    kw = dict(alpha=float(ds_cfg.alpha), beta=float(ds_cfg.beta), iid=bool(ds_cfg.iid),
              dimension=int(ds_cfg.dimension), classes=int(ds_cfg.classes), size_mean=float(ds_cfg.size_mean),
              size_sigma=float(ds_cfg.size_sigma), min_size=int(ds_cfg.min_size))
    xs, ys, owners, xts, yts = [], [], [], [], []
    for k in range(num_devices):
        x, y = device(k, seed, **kw)
        cut = int(0.9 * len(y))
        xs.append(x[:cut]), ys.append(y[:cut]), owners.append(np.full(cut, k, np.int64))
        xts.append(x[cut:]), yts.append(y[cut:])
    shape = (-1, kw["dimension"], 1, 1)
    return (np.concatenate(xs).reshape(shape), np.concatenate(ys), np.concatenate(owners),
            np.concatenate(xts).reshape(shape), np.concatenate(yts))
