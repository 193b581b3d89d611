"""Inverting gradients — Geiping, Bauermeister, Dröge, Moeller, "Inverting Gradients — How easy is it
to break privacy in federated learning?" (NeurIPS 2020).

Find inputs x whose client update matches the observed one in *direction*:

    x* = argmin_{x in [0,1]^n}  1 - <ΔW(x, y), ΔW*> / (||ΔW(x, y)|| ||ΔW*||)  +  α_TV TV(x)      (eq. 4)

ΔW(x, y) is the client's local training replayed on candidate data (one gradient for FedSGD; the
unrolled local steps for FedAvg, section 5). Optimised with Adam on the *signed* gradient of the
objective (the paper's choice), the step size divided by 10 at 3/8, 5/8 and 7/8 of the iterations,
x projected onto the box of valid images after every step; several restarts from random inputs,
keeping the one with the lowest objective. Labels come from ``knowledge.labels`` if given, else
from the head's update (iDLG for one example, bias-corrected counts for a batch).

Optional: ``bn_prior`` > 0 adds GradInversion's BatchNorm statistics term (Yin et al. 2021).

Defaults: Adam step 0.1 on the signed gradient, boxed, step decay (the paper's optimiser); α_TV = 1e-4.
With signed steps the *sign* of each pixel's gradient is all that counts, and a TV weight like breaching's
0.2 decides that sign almost everywhere (measured on CIFAR-10 images 5 and 6, which the benchmark's targets
do not use, ConvNet width 64, 1,000 iterations: 20.4 / 14.5 dB at 0.2, 21.2 / 16.4 dB at 1e-3, 26.8 /
21.3 dB at 1e-4, 26.3 / 17.5 dB at 0). The paper runs 24,000 iterations with up to 8 restarts on trained
ResNets; fl-sim's default is 1,000 iterations and 1 restart (``iterations``, ``restarts``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from attacks.base import Knowledge, Observation, Reconstruction
from attacks.labels import batch_labels, idlg_label
from attacks.matching import BatchNormPrior, UpdateSimulator, batchnorm_targets, cosine_distance, total_variation


def recover_labels(model, observation: Observation, knowledge: Knowledge, sim: UpdateSimulator) -> torch.Tensor:
    """Labels for the candidate batch: given, or recovered from the head's update."""
    if knowledge.labels is not None:
        return knowledge.labels.to(knowledge.device)
    update = dict(zip(sim.names, sim.target(observation)))
    n = knowledge.num_examples
    if n == 1:
        return torch.tensor([idlg_label(model, update)], device=knowledge.device)
    return batch_labels(model, update, n, knowledge.input_shape, knowledge.num_classes,
                        local_batch_size=knowledge.batch_size, epochs=knowledge.local_epochs).to(knowledge.device)


@dataclass
class InvertingGradients:
    iterations: int = 1000
    restarts: int = 1
    lr: float = 0.1
    tv: float = 1e-4
    bn_prior: float = 0.0
    signed: bool = True
    train_mode: bool = True  # replay local training with BatchNorm in train mode (as clients do)
    seed: int = 0
    name: str = "inverting_gradients"

    def reconstruct(self, observation: Observation, knowledge: Knowledge,
                    progress: Callable[[int, float], None] | None = None) -> Reconstruction:
        model = knowledge.model_at(observation.before)
        sim = UpdateSimulator(model, knowledge, train_mode=self.train_mode)
        target = sim.target(observation)
        labels = recover_labels(model, observation, knowledge, sim)
        mean, std, low, high = knowledge.bounds()
        shape = (knowledge.num_examples, *knowledge.input_shape)
        prior = None
        if self.bn_prior > 0:
            prior = BatchNormPrior(model, batchnorm_targets(model, observation, knowledge.local_steps))
        gen = torch.Generator().manual_seed(self.seed)
        best_x, best_loss = None, float("inf")
        evaluations = 0
        milestones = [int(self.iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)]
        for restart in range(self.restarts):
            x = torch.randn(shape, generator=gen).to(knowledge.device).requires_grad_(True)
            opt = torch.optim.Adam([x], lr=self.lr)
            sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
            loss = torch.tensor(float("inf"))
            for it in range(self.iterations):
                opt.zero_grad(set_to_none=True)
                if prior is not None:
                    prior.reset()
                match = cosine_distance(sim(x, labels), target)
                loss = match + self.tv * total_variation(x)
                if prior is not None:
                    loss = loss + self.bn_prior * prior.loss()
                (x.grad,) = torch.autograd.grad(loss, [x])
                evaluations += 1
                if self.signed:
                    x.grad.sign_()
                opt.step()
                sched.step()
                with torch.no_grad():
                    x.data = torch.max(torch.min(x, high), low)
                if progress is not None and (it + 1) % max(1, self.iterations // 10) == 0:
                    progress(restart * self.iterations + it + 1, float(match))
            final = self._objective(sim, x.detach(), labels, target, prior)
            evaluations += 1
            if final < best_loss:
                best_x, best_loss = x.detach().clone(), final
        if prior is not None:
            prior.remove()
        images = (best_x * std + mean).clamp(0, 1)
        return Reconstruction(images.cpu(), labels.cpu(), iterations=self.iterations * self.restarts,
                              evaluations=evaluations, loss=best_loss,
                              info={"labels_given": knowledge.labels is not None})

    def _objective(self, sim, x, labels, target, prior) -> float:
        x = x.clone().requires_grad_(True)  # the replay needs a graph through x
        if prior is not None:
            prior.reset()
        loss = cosine_distance(sim(x, labels), target) + self.tv * total_variation(x)
        if prior is not None:
            loss = loss + self.bn_prior * prior.loss()
        return float(loss.detach())
