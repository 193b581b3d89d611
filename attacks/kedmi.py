"""KEDMI — knowledge-enriched distributional model inversion, Chen, Yang, Yu, Wang and Li, "Knowledge-
Enriched Distributional Model Inversion Attacks" (ICCV 2021).

Two changes to GMI (``attacks.gmi``), both in the paper:

1. **An inversion-specific GAN** (``fit_prior``). The discriminator has K outputs, one per class of the
   target (the (K+1)-th, "fake", is the implicit class of Salimans et al.'s semi-supervised GAN: real
   means a large logsumexp of the K logits). On the auxiliary public data it learns the target's *soft
   labels* (cross-entropy to softmax(T(x))) besides real-versus-fake, so the GAN knows which public
   features the target associates with each private class. The generator is trained by feature
   matching on the discriminator's penultimate features plus an entropy term (weight 1e-4) that makes
   the discriminator's reading of its images confident. Adam lr 2e-4, betas (0.5, 0.999), five
   discriminator steps per generator step (``critic_steps``: ``n_critic`` 5 in the authors' code, as GMI's).
2. **A distribution per class** (``reconstruct``): instead of single latents, a Gaussian N(μ_y, σ_y²) in
   latent space per target class, learned by the reparameterisation trick on
   ``L_prior + λ · CE(T(G(z)), y)`` with L_prior = −log P_D(real | G(z)), λ = 100, Adam lr 0.02, 1,500
   iterations, ``samples`` latents drawn per class and iteration. The reconstructions are draws from
   the learned distributions.

The prior depends on the target model (its soft labels): it is cached per target.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.nn import functional as F

from attacks.base import Knowledge, ModelObservation, Reconstruction, autocast
from attacks.generative import Critic, GANPrior, Generator, auxiliary_images, precision_key, to_model


def _real_logit(logits: torch.Tensor) -> torch.Tensor:
    """log P(real) − log P(fake) of the semi-supervised discriminator: logsumexp of the K class logits."""
    return torch.logsumexp(logits, dim=1)


@dataclass
class KEDMI(GANPrior):
    iterations: int = 1500
    lr: float = 0.02
    lam: float = 100.0
    samples: int = 8
    per_class: int = 5
    latent_dim: int = 100
    width: int = 64
    gan_steps: int = 2000
    gan_batch_size: int = 64
    gan_lr: float = 2e-4
    entropy_weight: float = 1e-4
    critic_steps: int = 5  # discriminator steps per generator step (gan_steps counts generator steps)
    precision: str = "float32"  # bfloat16: autocast the forward passes (attacks.base.autocast)
    seed: int = 0
    name: str = field(default="kedmi", init=False)
    generator: Generator | None = field(default=None, init=False, repr=False)
    discriminator: Critic | None = field(default=None, init=False, repr=False)

    prior_uses_target = True  # the discriminator learns the target's soft labels

    def prior_key(self) -> dict:
        return {"prior": "kedmi_semi_supervised", "latent_dim": self.latent_dim, "width": self.width,
                "steps": self.gan_steps, "batch_size": self.gan_batch_size, "lr": self.gan_lr,
                "entropy_weight": self.entropy_weight, "critic_steps": self.critic_steps, "seed": self.seed,
                **precision_key(self.precision)}

    def _networks(self, knowledge: Knowledge) -> None:
        torch.manual_seed(self.seed)
        self.generator = Generator(self.latent_dim, knowledge.input_shape, self.width)
        self.discriminator = Critic(knowledge.input_shape, self.width, outputs=knowledge.num_classes)

    def fit_prior(self, knowledge: Knowledge, target: torch.nn.Module,
                  progress: Callable[[int, float, float], None] | None = None) -> dict:
        dev = knowledge.device  # everything on the attack's device; the random draws on the CPU (seeded), moved there
        real = auxiliary_images(knowledge, self.name).to(dev)
        aux = knowledge.auxiliary_inputs.to(dev)
        with torch.no_grad():
            soft = torch.cat([F.softmax(target(b), 1) for b in aux.split(512)])  # the target's soft labels
        self._networks(knowledge)
        g, d = self.generator.to(dev).train(), self.discriminator.to(dev).train()
        opt_g = torch.optim.Adam(g.parameters(), lr=self.gan_lr, betas=(0.5, 0.999))
        opt_d = torch.optim.Adam(d.parameters(), lr=self.gan_lr, betas=(0.5, 0.999))
        gen = torch.Generator().manual_seed(self.seed)
        n, b = len(real), min(self.gan_batch_size, len(real))
        loss_d = loss_g = torch.tensor(float("nan"))
        for step in range(self.gan_steps):
            for _ in range(max(1, self.critic_steps)):
                idx = torch.randint(n, (b,), generator=gen).to(dev)
                xr, pr = real[idx], soft[idx]
                z = torch.randn(b, self.latent_dim, generator=gen).to(dev)
                with autocast(self.precision, dev):
                    with torch.no_grad():
                        xf = g(z).float()
                    out_r, out_f = d(xr).float(), d(xf).float()
                lse_r, lse_f = _real_logit(out_r), _real_logit(out_f)
                supervised = -(pr * F.log_softmax(out_r, 1)).sum(1).mean()
                unsupervised = 0.5 * (F.softplus(lse_r).mean() - lse_r.mean()) + 0.5 * F.softplus(lse_f).mean()
                loss_d = supervised + unsupervised
                opt_d.zero_grad(set_to_none=True)
                loss_d.backward()
                opt_d.step()
            with autocast(self.precision, dev):
                xf = g(torch.randn(b, self.latent_dim, generator=gen).to(dev)).float()
                f_fake, f_real, out_f = d.features(xf).float(), d.features(xr).float(), d(xf).float()
            matching = (f_fake.mean(0) - f_real.mean(0).detach()).abs().mean()
            p_fake = F.softmax(out_f, 1)
            entropy = -(p_fake * torch.log(p_fake + 1e-8)).sum(1).mean()
            loss_g = matching + self.entropy_weight * entropy
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
        g, d = self.frozen_prior(knowledge)
        target = knowledge.frozen_model_at(observation.state)
        mean, std, _, _ = knowledge.bounds()
        classes = knowledge.classes_to_reconstruct()
        k = len(classes)
        gen = torch.Generator().manual_seed(self.seed + 1)
        mu = torch.zeros(k, self.latent_dim, device=knowledge.device, requires_grad=True)
        log_var = torch.zeros(k, self.latent_dim, device=knowledge.device, requires_grad=True)
        opt = torch.optim.Adam([mu, log_var], lr=self.lr)
        y = torch.tensor(classes, device=knowledge.device).repeat_interleave(self.samples)
        identity = torch.zeros(())
        for it in range(self.iterations):
            eps = torch.randn(k, self.samples, self.latent_dim, generator=gen).to(knowledge.device)
            z = (mu[:, None] + torch.exp(0.5 * log_var)[:, None] * eps).reshape(-1, self.latent_dim)
            with autocast(self.precision, knowledge.device):
                x = g(z).float()
                lse = _real_logit(d(x).float())
                logits = target(to_model(x, mean, std)).float()
            prior = F.softplus(lse) - lse  # −log P_D(real | x)
            identity = F.cross_entropy(logits, y, reduction="none")
            loss = (prior + self.lam * identity).view(k, self.samples).mean(1).sum()  # each class its own
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if progress is not None and (it + 1) % max(1, self.iterations // 10) == 0:
                progress(it + 1, float(identity.detach().mean()))
        with torch.no_grad():
            eps = torch.randn(k, self.per_class, self.latent_dim, generator=gen).to(knowledge.device)
            z = (mu[:, None] + torch.exp(0.5 * log_var)[:, None] * eps).reshape(-1, self.latent_dim)
            images = g(z).clamp(0, 1).cpu()
        labels = torch.tensor(classes).repeat_interleave(self.per_class)
        sigma = float(torch.exp(0.5 * log_var.detach()).mean())
        return Reconstruction(images, labels, iterations=self.iterations, evaluations=self.iterations * self.samples,
                              loss=float(identity.detach().mean()), info={"sigma_mean": sigma})
