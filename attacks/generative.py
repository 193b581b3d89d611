"""The generative prior that GAN-based model-inversion attacks share: a small DCGAN generator and a
critic sized for the images (8x8 to 32x32), and WGAN-GP training (Gulrajani et al., "Improved
Training of Wasserstein GANs", NeurIPS 2017) on the attacker's auxiliary data, as GMI trains it
(gradient penalty 10, 5 critic steps per generator step, Adam lr 2e-4, betas (0.5, 0.999)).

Images cross these functions in [0, 1]; the target model's normalisation is the caller's (``to_model``).
GMI's networks are DCGANs for 64x64 faces; these keep their form (a fully connected layer to a 1/4-size
map, two transposed-conv blocks with BatchNorm; a critic of two strided convs without normalisation, as
WGAN-GP asks) at the small sizes fl-sim's datasets have.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from attacks.base import Knowledge, autocast


def to_model(x01: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """[0, 1] images -> the target model's normalised input space."""
    return (x01 - mean) / std


class Generator(nn.Module):
    """z (latent_dim) [+ a class embedding when ``num_classes`` > 0] -> (C, H, W) images in [0, 1]."""

    def __init__(self, latent_dim: int, shape: tuple[int, int, int], width: int = 64, num_classes: int = 0):
        super().__init__()
        c, h, w = shape
        self.shape, self.latent_dim = tuple(shape), latent_dim
        self.s, self.t = math.ceil(h / 4), math.ceil(w / 4)
        self.width = width
        self.embed = nn.Embedding(num_classes, latent_dim) if num_classes > 0 else None
        self.fc = nn.Sequential(nn.Linear(latent_dim, 2 * width * self.s * self.t),
                                nn.BatchNorm1d(2 * width * self.s * self.t), nn.ReLU())
        self.net = nn.Sequential(
            nn.ConvTranspose2d(2 * width, width, 4, 2, 1), nn.BatchNorm2d(width), nn.ReLU(),
            nn.ConvTranspose2d(width, c, 4, 2, 1), nn.Sigmoid())

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if self.embed is not None:
            z = z * self.embed(y)  # conditioning by a class embedding (PLG-MI's generator is conditional)
        x = self.fc(z).view(-1, 2 * self.width, self.s, self.t)
        return self.net(x)[:, :, : self.shape[1], : self.shape[2]]


class Critic(nn.Module):
    """(C, H, W) images in [0, 1] -> ``outputs`` scores (1 for a WGAN critic, K for KEDMI's
    discriminator); with ``num_classes`` > 0 a projection term for class-conditional scores (Miyato &
    Koyama 2018); ``spectral``: spectral normalisation of every layer (SNGAN, Miyato et al. 2018)."""

    def __init__(self, shape: tuple[int, int, int], width: int = 64, outputs: int = 1, num_classes: int = 0,
                 spectral: bool = False):
        super().__init__()
        c, h, w = shape
        sn = nn.utils.parametrizations.spectral_norm if spectral else (lambda m: m)  # SNGAN's normalisation
        self.body = nn.Sequential(
            sn(nn.Conv2d(c, width, 4, 2, 1)), nn.LeakyReLU(0.2),
            sn(nn.Conv2d(width, 2 * width, 4, 2, 1)), nn.LeakyReLU(0.2), nn.Flatten())
        with torch.no_grad():
            features = self.body(torch.zeros(1, c, h, w)).shape[1]
        self.head = sn(nn.Linear(features, outputs))
        self.project = sn(nn.Embedding(num_classes, features)) if num_classes > 0 else None

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        f = self.body(x)
        out = self.head(f)
        if self.project is not None:
            out = out + (self.project(y) * f).sum(1, keepdim=True)
        return out.squeeze(1) if out.shape[1] == 1 else out


def auxiliary_images(knowledge: Knowledge, attack: str) -> torch.Tensor:
    """The attacker's auxiliary data as [0, 1] images on the CPU (what a GAN prior trains on); a
    ValueError when it has none."""
    if knowledge.auxiliary_inputs is None or len(knowledge.auxiliary_inputs) == 0:
        raise ValueError(f"{attack} needs auxiliary data to train its GAN (knowledge.auxiliary_inputs is empty)")
    mean, std, _, _ = knowledge.bounds()
    return (knowledge.auxiliary_inputs.to(mean.device) * std + mean).clamp(0, 1).cpu()


class GANPrior:
    """What the GAN-based attacks (gmi, kedmi, plgmi) share about their prior: its networks'
    state for the cache, and the networks frozen for the latent search. The attack builds them in
    ``_networks(knowledge)`` and trains them in ``fit_prior``."""

    generator: Generator | None
    discriminator: Critic | None

    def _networks(self, knowledge: Knowledge) -> None:
        raise NotImplementedError

    def prior_state_dict(self) -> dict:
        """The networks' state on the CPU (for the cache, wherever the prior was trained)."""
        return {"generator": _cpu(self.generator.state_dict()), "discriminator": _cpu(self.discriminator.state_dict())}

    def load_prior_state_dict(self, state: dict, knowledge: Knowledge) -> None:
        self._networks(knowledge)
        self.generator.load_state_dict(state["generator"])
        self.discriminator.load_state_dict(state["discriminator"])
        self.generator.eval()
        self.discriminator.eval()

    def frozen_prior(self, knowledge: Knowledge) -> tuple[Generator, Critic]:
        if self.generator is None:
            raise RuntimeError(f"{getattr(self, 'name', 'attack')}: train or load its prior first "
                               "(fit_prior / load_prior_state_dict)")
        g, d = self.generator.to(knowledge.device).eval(), self.discriminator.to(knowledge.device).eval()
        for p in [*g.parameters(), *d.parameters()]:
            p.requires_grad_(False)
        return g, d


def precision_key(precision: str) -> dict:
    """The prior cache key's part for the GAN's arithmetic: nothing for float32 (the keys of priors trained
    before there was a choice stay valid), the precision otherwise."""
    return {} if precision == "float32" else {"precision": precision}


def _cpu(state: dict) -> dict:
    return {k: v.detach().cpu() for k, v in state.items()}


def gradient_penalty(critic: Callable[[torch.Tensor], torch.Tensor], real: torch.Tensor, fake: torch.Tensor,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """WGAN-GP's penalty: (||∇ D(x̂)||₂ − 1)² at random interpolates x̂ of real and fake images."""
    eps = torch.rand(len(real), 1, 1, 1, generator=generator).to(real.device)
    x = (eps * real + (1 - eps) * fake).requires_grad_(True)
    out = critic(x).float()
    grad, = torch.autograd.grad(out.sum(), x, create_graph=True)
    return ((grad.flatten(1).norm(dim=1) - 1) ** 2).mean()


def train_wgan_gp(generator: Generator, critic: Critic, real: torch.Tensor, *, steps: int, batch_size: int = 64,
                  lr: float = 2e-4, betas: tuple[float, float] = (0.5, 0.999), critic_steps: int = 5,
                  penalty: float = 10.0, seed: int = 0, precision: str = "float32",
                  progress: Callable[[int, float, float], None] | None = None) -> dict:
    """Train ``generator`` and ``critic`` as a WGAN-GP on ``real`` ([0, 1] images) for ``steps``
    generator steps (each after ``critic_steps`` critic steps); returns the last losses. The networks and
    ``real`` are on one device; the random draws are made on the CPU (``seed``) and moved there.
    ``precision``: the forward passes' arithmetic (``attacks.base.autocast``)."""
    device = real.device
    gen = torch.Generator().manual_seed(seed)
    opt_g = torch.optim.Adam(generator.parameters(), lr=lr, betas=betas)
    opt_d = torch.optim.Adam(critic.parameters(), lr=lr, betas=betas)
    generator.train()
    critic.train()
    n = len(real)
    loss_d = loss_g = torch.tensor(float("nan"))
    for step in range(steps):
        for _ in range(critic_steps):
            xr = real[torch.randint(n, (min(batch_size, n),), generator=gen).to(device)]
            z = torch.randn(len(xr), generator.latent_dim, generator=gen).to(device)
            with autocast(precision, device):
                with torch.no_grad():
                    xf = generator(z).float()
                loss_d = critic(xf).float().mean() - critic(xr).float().mean() + \
                    penalty * gradient_penalty(critic, xr, xf, gen)
            opt_d.zero_grad(set_to_none=True)
            loss_d.backward()
            opt_d.step()
        z = torch.randn(min(batch_size, n), generator.latent_dim, generator=gen).to(device)
        with autocast(precision, device):
            loss_g = -critic(generator(z)).float().mean()
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
        if progress is not None and ((step + 1) % max(1, steps // 10) == 0 or step + 1 == steps):
            progress(step + 1, float(loss_d.detach()), float(loss_g.detach()))
    generator.eval()
    critic.eval()
    return {"critic_loss": float(loss_d.detach()), "generator_loss": float(loss_g.detach())}


def class_batches(classes: tuple[int, ...], per_class: int, restarts: int) -> torch.Tensor:
    """The target label of every latent optimised at once: each class × per_class images × restarts."""
    return torch.tensor(classes, dtype=torch.long).repeat_interleave(per_class * restarts)


def best_of_restarts(images: torch.Tensor, losses: torch.Tensor, labels: torch.Tensor, per_class: int,
                     restarts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Of each image's ``restarts`` candidates (laid out by ``class_batches``: restarts vary fastest), the
    one of lowest loss; ``per_class`` images of each class remain, in class order."""
    grouped = losses.detach().view(-1, restarts)
    pick = grouped.argmin(1) + torch.arange(len(grouped)) * restarts
    assert len(pick) % per_class == 0
    return images[pick], labels[pick]
