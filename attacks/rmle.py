"""rMLE — regularised maximum-likelihood estimation, the white-box model-inversion attack on split
learning of He, Zhang and Lee, "Model Inversion Attacks against Collaborative Inference" (ACSAC 2019),
§4.1.

The server receives a client's activations ``a = f(x)`` at the cut and knows the client-side model
``f`` (true in SplitFed, where the server averages the client models). It searches the input that
reproduces them, with total variation as the image prior (their eq. 2):

    x* = argmin_x  ||f(x) - a||²₂ + λ · TV(x)

optimised here with Adam from random noise, boxed to the data range, with step decay.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from attacks.base import Knowledge, Reconstruction
from attacks.matching import total_variation


@dataclass
class ActivationObservation:
    """What a split-learning server receives from a client for one batch: the activations at the cut
    (and, when labels travel with them, the labels)."""

    activations: torch.Tensor
    labels: torch.Tensor | None = None
    kind: str = "activations"


@dataclass
class RMLE:
    iterations: int = 2000
    lr: float = 0.05
    tv: float = 1e-3
    seed: int = 0
    name: str = "rmle"

    def reconstruct(self, observation: ActivationObservation, knowledge: Knowledge,
                    progress: Callable[[int, float], None] | None = None) -> Reconstruction:
        """``knowledge.model`` is the client-side model (white box, with its weights)."""
        # a copy on the attack's device: knowledge.model stays where it is, as it is (a Ray task sends its job,
        # knowledge included, back to the driver, which must not receive CUDA tensors)
        bottom: nn.Module = copy.deepcopy(knowledge.model).to(knowledge.device).eval()
        for p in bottom.parameters():
            p.requires_grad_(False)
        target = observation.activations.to(knowledge.device).detach()
        mean, std, low, high = knowledge.bounds()
        gen = torch.Generator().manual_seed(self.seed)
        x = torch.randn((len(target), *knowledge.input_shape), generator=gen).to(knowledge.device)
        x = torch.max(torch.min(x, high), low).requires_grad_(True)
        opt = torch.optim.Adam([x], lr=self.lr)
        milestones = [int(self.iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)]
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
        match = torch.tensor(float("nan"))
        for it in range(self.iterations):
            opt.zero_grad(set_to_none=True)
            match = (bottom(x) - target).pow(2).sum() / len(target)
            loss = match + self.tv * total_variation(x)
            loss.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                x.data = torch.max(torch.min(x, high), low)
            if progress is not None and (it + 1) % max(1, self.iterations // 10) == 0:
                progress(it + 1, float(match.detach()))
        images = (x.detach() * std + mean).clamp(0, 1)
        labels = None if observation.labels is None else observation.labels.cpu()
        return Reconstruction(images.cpu(), labels, iterations=self.iterations, evaluations=self.iterations,
                              loss=float(match.detach()), info={"labels_given": labels is not None})
