"""The active malicious participant of Hitaj, Ateniese and Pérez-Cruz, "Deep Models Under the GAN:
Information Leakage from Collaborative Deep Learning" (CCS 2017).

The attacker is a client. Every round it takes part in, it:

1. trains a generator G against the global model T it has just received, which plays the
   discriminator: min_G CE(T(G(z, y)), y) for the classes y it lacks (one conditional generator for all
   of them, kept from round to round);
2. generates samples of those classes and labels them with a class of its own (``fake_label``), then
   trains on its own data plus these samples, as any client trains.

Step 2 is what makes it active: to keep telling the target classes from the fake-labelled samples,
the victims' updates must sharpen what the target classes look like, and T, the next round's
discriminator, gets better at it (their Sec. 5). With no sample injected (``injected=0``) the same
attacker is passive: it trains G against each round's model and influences nothing.

``reconstruct`` is step 1 followed by ``per_class`` samples of each target class: what the evaluator
scores each round. ``samples(n)`` gives the images to inject. The generator is the small DCGAN of
``attacks.generative`` (the paper's networks are for 28x28 and 64x64 images of their own design);
Adam, lr 2e-4, betas (0.5, 0.999), as DCGAN. Pure PyTorch: the caller puts the samples into training.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.nn import functional as F

from attacks.base import Knowledge, ModelObservation, Reconstruction, autocast
from attacks.generative import Generator, to_model


@dataclass
class Hitaj:
    iterations: int = 200  # generator steps per round (against that round's model)
    lr: float = 2e-4
    per_class: int = 5  # samples per target class handed to the evaluator each round
    injected: int = 50  # samples per target class the attacker trains on, fake-labelled (0: passive)
    latent_dim: int = 100
    width: int = 32
    batch_size: int = 64
    precision: str = "float32"  # bfloat16: autocast the forward passes (attacks.base.autocast)
    seed: int = 0
    name: str = field(default="hitaj", init=False)
    generator: Generator | None = field(default=None, init=False, repr=False)
    optimizer: torch.optim.Optimizer | None = field(default=None, init=False, repr=False)
    steps: int = field(default=0, init=False)  # generator steps so far, over every round

    def _setup(self, knowledge: Knowledge) -> None:
        if self.generator is None:  # kept from round to round: the GAN goes on learning
            torch.manual_seed(self.seed)
            self.generator = Generator(self.latent_dim, knowledge.input_shape, self.width,
                                       num_classes=knowledge.num_classes).to(knowledge.device)
            self.optimizer = torch.optim.Adam(self.generator.parameters(), lr=self.lr, betas=(0.5, 0.999))

    def train_generator(self, observation: ModelObservation, knowledge: Knowledge,
                        progress: Callable[[int, float], None] | None = None) -> float:
        """``iterations`` generator steps against the model of ``observation``; the last batch's loss."""
        self._setup(knowledge)
        target = knowledge.frozen_model_at(observation.state)
        mean, std, _, _ = knowledge.bounds()
        classes = torch.tensor(knowledge.classes_to_reconstruct(), device=knowledge.device)
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.steps)
        g = self.generator.train()
        loss = torch.zeros(())
        for it in range(self.iterations):
            y = classes[torch.randint(len(classes), (self.batch_size,), generator=gen).to(knowledge.device)]
            z = torch.randn(self.batch_size, self.latent_dim, generator=gen).to(knowledge.device)
            with autocast(self.precision, knowledge.device):
                logits = target(to_model(g(z, y).float(), mean, std)).float()
            loss = F.cross_entropy(logits, y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.steps += 1
            if progress is not None and ((it + 1) % max(1, self.iterations // 10) == 0):
                progress(it + 1, float(loss.detach()))
        return float(loss.detach())

    def samples(self, n_per_class: int, knowledge: Knowledge, salt: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """``n_per_class`` images in [0, 1] of each target class from the generator as it is, and their classes."""
        self._setup(knowledge)
        classes = knowledge.classes_to_reconstruct()
        y = torch.tensor(classes).repeat_interleave(n_per_class).to(knowledge.device)
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.steps + 7_919 * (salt + 1))
        z = torch.randn(len(y), self.latent_dim, generator=gen).to(knowledge.device)
        with torch.no_grad():
            x = self.generator.train()(z, y)  # batch statistics, as in training
        return x.clamp(0, 1).cpu(), y.cpu()

    def state_dict(self) -> dict:
        """What the attacker has learned so far (generator, its optimiser, the step count that seeds its draws),
        so that a resumed run goes on exactly as an uninterrupted one."""
        if self.generator is None:
            return {"steps": self.steps}
        return {"steps": self.steps, "optimizer": self.optimizer.state_dict(),
                "generator": {k: v.detach().cpu().clone() for k, v in self.generator.state_dict().items()}}

    def load_state_dict(self, state: dict, knowledge: Knowledge) -> None:
        """Continue from ``state_dict()`` (the same architecture and classes)."""
        self.steps = int(state["steps"])
        if "generator" in state:
            self._setup(knowledge)
            self.generator.load_state_dict(state["generator"])
            self.optimizer.load_state_dict(state["optimizer"])

    def reconstruct(self, observation: ModelObservation, knowledge: Knowledge,
                    progress: Callable[[int, float], None] | None = None) -> Reconstruction:
        """One round of the attacker's GAN: train G against this round's model, then sample each target class."""
        loss = self.train_generator(observation, knowledge, progress)
        images, labels = self.samples(self.per_class, knowledge)
        return Reconstruction(images, labels, iterations=self.iterations, evaluations=self.iterations, loss=loss,
                              info={"generator_loss": loss, "generator_steps": self.steps})
