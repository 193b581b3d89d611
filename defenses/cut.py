"""Defenses at the cut of split learning (applied by the client to what it sends).

- ``noisy_activations``: Gaussian or Laplace noise on the activations (Titcombe et al. 2021,
  "Practical Defences Against Model Inversion Attacks for Split Neural Networks").
- ``dropout_activations``: dropout at the cut, kept at inference-free training time (He et al. 2019 §6).
- ``distance_correlation``: NoPeek's leakage term (Vepakomma et al., "NoPeek: Information leakage
  reduction to share activations in distributed deep learning", ICDMW 2020): the client adds
  ``alpha * dCor(x, activations)`` to its loss so that activations decorrelate from the raw input.
"""

from __future__ import annotations

import torch


def noisy_activations(a: torch.Tensor, scale: float, kind: str = "gaussian",
                      generator: torch.Generator | None = None) -> torch.Tensor:
    if scale <= 0:
        return a
    if kind == "gaussian":
        noise = torch.randn(a.shape, generator=generator) * scale
    elif kind == "laplace":
        u = torch.rand(a.shape, generator=generator) - 0.5
        noise = -scale * torch.sign(u) * torch.log1p(-2 * u.abs())
    else:
        raise ValueError(f"noise kind {kind!r} is not known; choose gaussian or laplace")
    return a + noise.to(a.device, a.dtype)


def dropout_activations(a: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    if p <= 0:
        return a
    keep = (torch.rand(a.shape, generator=generator) >= p).to(a.device, a.dtype)
    return a * keep / (1 - p)


def distance_correlation(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Sample distance correlation (Székely et al. 2007) between the rows of x and z, in [0, 1]."""

    def centred(d: torch.Tensor) -> torch.Tensor:
        return d - d.mean(0, keepdim=True) - d.mean(1, keepdim=True) + d.mean()

    a, b = centred(torch.cdist(x.flatten(1), x.flatten(1))), centred(torch.cdist(z.flatten(1), z.flatten(1)))
    dcov_xz, dcov_xx, dcov_zz = (a * b).mean(), (a * a).mean(), (b * b).mean()
    return (dcov_xz.clamp(min=0) / (dcov_xx.sqrt() * dcov_zz.sqrt()).clamp(min=1e-12)).sqrt()
