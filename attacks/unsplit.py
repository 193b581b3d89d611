"""UnSplit — Erdogan, Küpçü and Çiçek, "UnSplit: Data-Oblivious Model Inversion, Model Stealing, and
Label Inference Attacks against Split Learning" (WPES 2022).

The server knows the client-side *architecture* but not its weights. It optimises, in alternation, the
input estimate x̂ and a clone f̂ of the client model so that f̂(x̂) reproduces the observed activations,
with total variation on x̂ (their Algorithm 1):

    min_{x̂, f̂}  ||f̂(x̂) - a||²₂ + λ · TV(x̂)
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable

import torch

from attacks.base import Knowledge, Reconstruction
from attacks.matching import total_variation


@dataclass
class UnSplit:
    rounds: int = 100  # alternations
    input_steps: int = 20
    model_steps: int = 20
    lr_input: float = 0.01
    lr_model: float = 1e-3
    tv: float = 1e-3
    seed: int = 0
    name: str = "unsplit"

    def reconstruct(self, observation, knowledge: Knowledge,
                    progress: Callable[[int, float], None] | None = None) -> Reconstruction:
        """``knowledge.model``: the client-side architecture; its weights are re-initialised (unknown)."""
        torch.manual_seed(self.seed)
        clone = copy.deepcopy(knowledge.model).cpu()
        for m in clone.modules():  # the server does not know the weights: start from a fresh init
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()  # on the CPU (its seeded generator): the same init on every device
        clone = clone.to(knowledge.device).train()
        target = observation.activations.to(knowledge.device).detach()
        mean, std, low, high = knowledge.bounds()
        gen = torch.Generator().manual_seed(self.seed)
        x = torch.zeros((len(target), *knowledge.input_shape)).to(knowledge.device)
        x = (x + (0.01 * torch.randn(x.shape, generator=gen)).to(knowledge.device)).requires_grad_(True)
        opt_x = torch.optim.Adam([x], lr=self.lr_input)
        opt_m = torch.optim.Adam(clone.parameters(), lr=self.lr_model)
        match = torch.tensor(float("nan"))
        for r in range(self.rounds):
            for _ in range(self.input_steps):
                opt_x.zero_grad(set_to_none=True)
                match = (clone(x) - target).pow(2).sum() / len(target)
                (match + self.tv * total_variation(x)).backward()
                opt_x.step()
                with torch.no_grad():
                    x.data = torch.max(torch.min(x, high), low)
            for _ in range(self.model_steps):
                opt_m.zero_grad(set_to_none=True)
                match = (clone(x.detach()) - target).pow(2).sum() / len(target)
                match.backward()
                opt_m.step()
            if progress is not None and (r + 1) % max(1, self.rounds // 10) == 0:
                progress(r + 1, float(match))
        images = (x.detach() * std + mean).clamp(0, 1)
        labels = None if observation.labels is None else observation.labels.cpu()
        evals = self.rounds * (self.input_steps + self.model_steps)
        return Reconstruction(images.cpu(), labels, iterations=self.rounds, evaluations=evals, loss=float(match),
                              info={"labels_given": labels is not None})
