"""GMI — the generative model-inversion attack, Zhang, Jia, Pei, Wang, Li and Song, "The Secret
Revealer: Generative Model-Inversion Attacks Against Deep Neural Networks" (CVPR 2020).

Two stages:

1. **Prior** (``fit_prior``): a WGAN-GP (``attacks.generative``) trained on the attacker's auxiliary
   public data only — it learns what images of the domain look like, not the private classes.
2. **Inversion** (``reconstruct``): for a target class y, find a latent z whose image the target model
   puts in class y while the critic finds it realistic (their eq. 3–4):

       min_z  L_prior(z) + λ · L_id(z),   L_prior = −D(G(z)),   L_id = CE(T(G(z)), y)

   with λ = 100, SGD with Nesterov momentum 0.9 (lr 0.02; 0.01 in their MNIST code), 1,500
   iterations, z clipped to [−1, 1] after every step, and 5 random restarts of which the one with the
   lowest identity loss is kept (the attacker has no evaluation network to choose with).

Every latent of every target class is optimised at once; as in the authors' code each loss is a mean
over a batch of 64 latents (``REFERENCE_BATCH``), so a latent's step does not depend on how many are
optimised together. The networks are small DCGANs for fl-sim's 8x8 to 32x32 images (theirs are for
64x64 faces); the GAN's steps are ``gan_steps`` generator updates.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.nn import functional as F

from attacks.base import Knowledge, ModelObservation, Reconstruction, autocast
from attacks.generative import (Critic, GANPrior, Generator, auxiliary_images, best_of_restarts, class_batches,
                                 precision_key, to_model, train_wgan_gp)

REFERENCE_BATCH = 64  # latents per batch in the authors' attack code: the losses are means over it


@dataclass
class GMI(GANPrior):
    iterations: int = 1500
    lr: float = 0.02
    momentum: float = 0.9
    lam: float = 100.0
    restarts: int = 5
    per_class: int = 5
    clip: float = 1.0
    latent_dim: int = 100
    width: int = 64
    gan_steps: int = 2000
    gan_batch_size: int = 64
    gan_lr: float = 2e-4
    critic_steps: int = 5
    gradient_penalty: float = 10.0
    precision: str = "float32"  # bfloat16: autocast the forward passes (attacks.base.autocast)
    seed: int = 0
    name: str = field(default="gmi", init=False)
    generator: Generator | None = field(default=None, init=False, repr=False)
    discriminator: Critic | None = field(default=None, init=False, repr=False)  # the WGAN critic

    # ------------------------------------------------------------------ the prior
    prior_uses_target = False  # the GAN sees the auxiliary data only

    def prior_key(self) -> dict:
        """What the trained prior depends on (besides the auxiliary data): the cache key's parts."""
        return {"prior": "wgan_gp", "latent_dim": self.latent_dim, "width": self.width, "steps": self.gan_steps,
                "batch_size": self.gan_batch_size, "lr": self.gan_lr, "critic_steps": self.critic_steps,
                "gradient_penalty": self.gradient_penalty, "seed": self.seed, **precision_key(self.precision)}

    def _networks(self, knowledge: Knowledge) -> None:
        torch.manual_seed(self.seed)
        self.generator = Generator(self.latent_dim, knowledge.input_shape, self.width)
        self.discriminator = Critic(knowledge.input_shape, self.width)

    def fit_prior(self, knowledge: Knowledge, target: torch.nn.Module | None = None,
                  progress: Callable[[int, float, float], None] | None = None) -> dict:
        """Train the WGAN-GP on ``knowledge.auxiliary_inputs`` (the attacker's public data), on ``knowledge.device``."""
        real = auxiliary_images(knowledge, self.name).to(knowledge.device)
        self._networks(knowledge)
        self.generator.to(knowledge.device)
        self.discriminator.to(knowledge.device)
        return train_wgan_gp(self.generator, self.discriminator, real, steps=self.gan_steps, batch_size=self.gan_batch_size,
                             lr=self.gan_lr, critic_steps=self.critic_steps, penalty=self.gradient_penalty,
                             seed=self.seed, precision=self.precision, progress=progress)

    # ------------------------------------------------------------------ the inversion
    def reconstruct(self, observation: ModelObservation, knowledge: Knowledge,
                    progress: Callable[[int, float], None] | None = None) -> Reconstruction:
        g, d = self.frozen_prior(knowledge)
        target = knowledge.frozen_model_at(observation.state)
        mean, std, _, _ = knowledge.bounds()
        classes = knowledge.classes_to_reconstruct()
        y = class_batches(classes, self.per_class, self.restarts).to(knowledge.device)
        gen = torch.Generator().manual_seed(self.seed + 1)
        z = torch.randn(len(y), self.latent_dim, generator=gen).to(knowledge.device).requires_grad_(True)
        opt = torch.optim.SGD([z], lr=self.lr, momentum=self.momentum, nesterov=True)
        identity = torch.zeros(len(y))
        for it in range(self.iterations):
            with autocast(self.precision, knowledge.device):
                x = g(z).float()
                identity = F.cross_entropy(target(to_model(x, mean, std)).float(), y, reduction="none")
                loss = (-d(x).float() + self.lam * identity).sum() / REFERENCE_BATCH
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                z.clamp_(-self.clip, self.clip)
            if progress is not None and ((it + 1) % max(1, self.iterations // 10) == 0):
                progress(it + 1, float(identity.detach().mean()))
        with torch.no_grad():
            x = g(z)
            identity = F.cross_entropy(target(to_model(x, mean, std)), y, reduction="none")
        images, labels = best_of_restarts(x.detach().cpu(), identity.cpu(), y.cpu(), self.per_class, self.restarts)
        return Reconstruction(images.clamp(0, 1), labels, iterations=self.iterations,
                              evaluations=self.iterations * self.restarts, loss=float(identity.mean()),
                              info={"identity_loss": float(identity.mean())})
