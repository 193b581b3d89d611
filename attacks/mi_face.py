"""MI-Face — Fredrikson, Jha and Ristenpart, "Model Inversion Attacks that Exploit Confidence
Information and Basic Countermeasures" (CCS 2015), their Algorithm 1: gradient descent on the input
itself to minimise the target's cost c(x) = 1 − f̃_y(x) (one minus the softmax confidence in class y),
with no image prior. The baseline every generative attack is measured against.

Their parameters: step λ = 0.1, at most α = 5,000 iterations, stop once the cost has not improved for
β = 100 iterations or once it is below 1 − γ with γ = 0.99. Their face-specific post-processing step
(denoising and sharpening) is replaced by a total-variation term of weight ``tv`` (the issue's
"smoothness term"; ours, 0 disables it). Images stay in [0, 1] (clamped after every step). Fredrikson et
al. start from a blank image; with several images per class each starts from seeded uniform noise so that
they differ.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch.nn import functional as F

from attacks.base import Knowledge, ModelObservation, Reconstruction, autocast
from attacks.generative import to_model


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Mean absolute difference of neighbouring pixels, per image."""
    return (x[:, :, 1:, :] - x[:, :, :-1, :]).abs().flatten(1).mean(1) + \
        (x[:, :, :, 1:] - x[:, :, :, :-1]).abs().flatten(1).mean(1)


@dataclass
class MIFace:
    iterations: int = 5000
    lr: float = 0.1
    patience: int = 100
    gamma: float = 0.99
    tv: float = 0.05
    per_class: int = 5
    precision: str = "float32"  # bfloat16: autocast the target's forward pass (attacks.base.autocast)
    seed: int = 0
    name: str = field(default="mi_face", init=False)

    def reconstruct(self, observation: ModelObservation, knowledge: Knowledge,
                    progress: Callable[[int, float], None] | None = None) -> Reconstruction:
        target = knowledge.frozen_model_at(observation.state)
        mean, std, _, _ = knowledge.bounds()
        classes = knowledge.classes_to_reconstruct()
        y = torch.tensor(classes, dtype=torch.long).repeat_interleave(self.per_class).to(knowledge.device)
        gen = torch.Generator().manual_seed(self.seed)
        x = torch.rand(len(y), *knowledge.input_shape, generator=gen).to(knowledge.device).requires_grad_(True)
        best = x.detach().clone()
        best_cost = torch.full((len(y),), float("inf"), device=x.device)
        stale = torch.zeros(len(y), dtype=torch.long, device=x.device)
        active = torch.ones(len(y), dtype=torch.bool, device=x.device)
        it = 0
        for it in range(1, self.iterations + 1):
            with autocast(self.precision, knowledge.device):
                logits = target(to_model(x, mean, std)).float()
            conf = F.softmax(logits, dim=1).gather(1, y[:, None]).squeeze(1)
            cost = 1 - conf + self.tv * total_variation(x)
            with torch.no_grad():
                better = cost < best_cost
                best[better] = x.detach()[better]
                best_cost = torch.where(better, cost.detach(), best_cost)
                stale = torch.where(better, torch.zeros_like(stale), stale + 1)
                active &= (stale < self.patience) & (1 - conf.detach() > 1 - self.gamma)
            if not active.any():
                break
            grad, = torch.autograd.grad(cost.sum(), x)
            with torch.no_grad():
                x -= self.lr * grad * active[:, None, None, None]
                x.clamp_(0, 1)
            if progress is not None and it % max(1, self.iterations // 10) == 0:
                progress(it, float(best_cost.mean()))
        return Reconstruction(best.cpu(), y.cpu(), iterations=it, evaluations=it, loss=float(best_cost.mean()),
                              info={"cost": float(best_cost.mean())})
