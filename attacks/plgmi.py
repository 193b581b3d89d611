"""PLG-MI — pseudo-label-guided model inversion, Yuan, Chen, Zhang, Wang and Yu, "Pseudo Label-Guided
Model Inversion Attack via Conditional Generative Adversarial Network" (AAAI 2023).

1. **Pseudo-labels** (``fit_prior``): the target model labels the attacker's public images; for each
   private class the ``top_k`` (30) public images it is most confident belong to that class form the
   class's training set. Public data that share no class with the private data still carry the
   features the target relies on.
2. **A conditional GAN** on those pseudo-labelled images: a class-conditional generator G(z, y) and a
   projection discriminator D(x, y), hinge loss; the generator's loss adds α = 0.2 times the
   max-margin loss of the target on augmented generated images, so that G(z, y) is steered into the
   target's class y while staying realistic. Adam lr 2e-4, betas (0, 0.9), ``critic_steps`` (5)
   discriminator steps per generator step, spectral normalisation in the discriminator, as SNGAN, on
   which the authors build.
3. **Latent search** (``reconstruct``): for class y, z minimising the max-margin loss
   −l_y + max_{j≠y} l_j of the target, summed over ``views`` (2, as the authors' code) independently
   augmented copies of G(z, y) (``augment``), Adam lr 0.1, 600 iterations; of ``restarts`` starts the
   one with the lowest loss on the plain image is kept.

The prior depends on the target model (its pseudo-labels and its max-margin term): it is cached per target.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.nn import functional as F

from attacks.base import Knowledge, ModelObservation, Reconstruction, autocast
from attacks.generative import (Critic, GANPrior, Generator, auxiliary_images, best_of_restarts, class_batches,
                                 precision_key, to_model)


def max_margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """−l_y + max_{j≠y} l_j per example (the Carlini–Wagner margin PLG-MI optimises)."""
    own = logits.gather(1, y[:, None]).squeeze(1)
    others = logits.masked_fill(F.one_hot(y, logits.shape[1]).bool(), float("-inf")).max(1).values
    return others - own


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """PLG-MI's augmentations (the authors' kornia list), drawn per image: a random resized crop of 80-100%
    of the area (square), a rotation of up to 5 degrees, brightness and contrast jitter of 0.2, and, for
    colour images only, horizontal flips (a flipped digit is another symbol)."""
    n = len(x)

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return (lo + (hi - lo) * torch.rand(n, generator=gen)).to(x.device)

    side = uniform(0.8, 1.0).sqrt()  # the crop's side, as a fraction of the image's
    angle = uniform(-5.0, 5.0) * (math.pi / 180)
    shift_x, shift_y = (1 - side) * uniform(-1.0, 1.0), (1 - side) * uniform(-1.0, 1.0)
    cos, sin = torch.cos(angle) * side, torch.sin(angle) * side
    theta = torch.stack([torch.stack([cos, -sin, shift_x], 1), torch.stack([sin, cos, shift_y], 1)], 1)
    if x.shape[1] == 3:
        flip = torch.where(uniform(0.0, 1.0) < 0.5, -1.0, 1.0)
        theta = theta * torch.stack([flip, torch.ones_like(flip), torch.ones_like(flip)], 1)[:, None, :]
    out = F.grid_sample(x, F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False), align_corners=False)
    brightness, contrast = uniform(0.8, 1.2)[:, None, None, None], uniform(0.8, 1.2)[:, None, None, None]
    out = out * brightness
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    return ((out - mean) * contrast + mean).clamp(0, 1)


@dataclass
class PLGMI(GANPrior):
    iterations: int = 600
    lr: float = 0.1
    restarts: int = 5
    views: int = 2
    per_class: int = 5
    top_k: int = 30
    alpha: float = 0.2
    latent_dim: int = 100
    width: int = 64
    gan_steps: int = 2000
    gan_batch_size: int = 64
    gan_lr: float = 2e-4
    critic_steps: int = 5
    precision: str = "float32"  # bfloat16: autocast the forward passes (attacks.base.autocast)
    seed: int = 0
    name: str = field(default="plgmi", init=False)
    generator: Generator | None = field(default=None, init=False, repr=False)
    discriminator: Critic | None = field(default=None, init=False, repr=False)

    prior_uses_target = True  # pseudo-labels and the max-margin term come from the target

    def prior_key(self) -> dict:
        return {"prior": "plgmi_conditional", "latent_dim": self.latent_dim, "width": self.width,
                "steps": self.gan_steps, "batch_size": self.gan_batch_size, "lr": self.gan_lr,
                "critic_steps": self.critic_steps, "top_k": self.top_k, "alpha": self.alpha, "seed": self.seed,
                "augment": "crop-rotate-jitter", **precision_key(self.precision)}

    def _networks(self, knowledge: Knowledge) -> None:
        torch.manual_seed(self.seed)
        k = knowledge.num_classes
        self.generator = Generator(self.latent_dim, knowledge.input_shape, self.width, num_classes=k)
        self.discriminator = Critic(knowledge.input_shape, self.width, num_classes=k, spectral=True)

    def pseudo_labels(self, knowledge: Knowledge, target: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``top_k`` public images per class by the target's confidence (their indices into the
        auxiliary data), with that class as label."""
        aux = knowledge.auxiliary_inputs
        with torch.no_grad():
            probs = torch.cat([F.softmax(target(b.to(knowledge.device)), 1).cpu() for b in aux.split(512)])
        k = min(self.top_k, len(aux))
        idx = probs.topk(k, dim=0).indices.T  # (classes, k)
        return idx.reshape(-1), torch.arange(probs.shape[1]).repeat_interleave(k)

    def fit_prior(self, knowledge: Knowledge, target: torch.nn.Module,
                  progress: Callable[[int, float, float], None] | None = None) -> dict:
        images = auxiliary_images(knowledge, self.name)
        mean, std, _, _ = knowledge.bounds()
        dev = mean.device  # everything on the attack's device; the random draws on the CPU (seeded), moved there
        target = target.eval()
        idx, y = self.pseudo_labels(knowledge, target)
        real, y = images[idx].to(dev), y.to(dev)
        self._networks(knowledge)
        g, d = self.generator.to(dev).train(), self.discriminator.to(dev).train()
        opt_g = torch.optim.Adam(g.parameters(), lr=self.gan_lr, betas=(0.0, 0.9))
        opt_d = torch.optim.Adam(d.parameters(), lr=self.gan_lr, betas=(0.0, 0.9))
        gen = torch.Generator().manual_seed(self.seed)
        n, b, k = len(real), min(self.gan_batch_size, len(real)), knowledge.num_classes
        loss_d = loss_g = torch.tensor(float("nan"))
        for step in range(self.gan_steps):
            for _ in range(self.critic_steps):
                idx = torch.randint(n, (b,), generator=gen).to(dev)
                yf = torch.randint(k, (b,), generator=gen).to(dev)
                with autocast(self.precision, dev):
                    with torch.no_grad():
                        xf = g(torch.randn(b, self.latent_dim, generator=gen).to(dev), yf).float()
                    out_r, out_f = d(real[idx], y[idx]).float(), d(xf, yf).float()
                loss_d = F.relu(1 - out_r).mean() + F.relu(1 + out_f).mean()
                opt_d.zero_grad(set_to_none=True)
                loss_d.backward()
                opt_d.step()
            yf = torch.randint(k, (b,), generator=gen).to(dev)
            with autocast(self.precision, dev):
                xf = g(torch.randn(b, self.latent_dim, generator=gen).to(dev), yf).float()
                logits = target(to_model(augment(xf, gen), mean, std)).float()
                critic = d(xf, yf).float()
            loss_g = -critic.mean() + self.alpha * max_margin(logits, yf).mean()
            opt_g.zero_grad(set_to_none=True)
            loss_g.backward()
            opt_g.step()
            if progress is not None and ((step + 1) % max(1, self.gan_steps // 10) == 0):
                progress(step + 1, float(loss_d.detach()), float(loss_g.detach()))
        g.eval()
        d.eval()
        return {"discriminator_loss": float(loss_d.detach()), "generator_loss": float(loss_g.detach())}

    def reconstruct(self, observation: ModelObservation, knowledge: Knowledge,
                    progress: Callable[[int, float], None] | None = None) -> Reconstruction:
        g, _ = self.frozen_prior(knowledge)
        target = knowledge.frozen_model_at(observation.state)
        mean, std, _, _ = knowledge.bounds()
        classes = knowledge.classes_to_reconstruct()
        y = class_batches(classes, self.per_class, self.restarts).to(knowledge.device)
        gen = torch.Generator().manual_seed(self.seed + 1)
        z = torch.randn(len(y), self.latent_dim, generator=gen).to(knowledge.device).requires_grad_(True)
        opt = torch.optim.Adam([z], lr=self.lr)
        for it in range(self.iterations):
            with autocast(self.precision, knowledge.device):
                x = g(z, y).float()
                loss = sum(max_margin(target(to_model(augment(x, gen), mean, std)).float(), y)
                           for _ in range(self.views))
            opt.zero_grad(set_to_none=True)
            loss.sum().backward()
            opt.step()
            if progress is not None and (it + 1) % max(1, self.iterations // 10) == 0:
                progress(it + 1, float(loss.detach().mean()))
        with torch.no_grad():
            x = g(z, y)
            final = max_margin(target(to_model(x, mean, std)), y)
        images, labels = best_of_restarts(x.cpu(), final.cpu(), y.cpu(), self.per_class, self.restarts)
        return Reconstruction(images.clamp(0, 1), labels, iterations=self.iterations,
                              evaluations=self.iterations * self.restarts, loss=float(final.mean()))
