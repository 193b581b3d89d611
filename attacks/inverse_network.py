"""Inverse network — the black-box attack on split learning of He, Zhang and Lee, "Model Inversion
Attacks against Collaborative Inference" (ACSAC 2019), §4.3.

The attacker can run the client-side model ``f`` on inputs of its own (query access, or a shadow copy
of the architecture trained on similar data) and holds auxiliary data from the client's distribution.
It trains a decoder ``g`` with ``g(f(x_aux)) ≈ x_aux`` (mean squared error), then maps the observed
activations back to inputs: ``x* = g(a)``. No per-example optimisation at attack time.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from attacks.base import Knowledge, Reconstruction


@dataclass
class InverseNetwork:
    epochs: int = 200
    lr: float = 1e-3
    hidden: int = 512
    batch_size: int = 64
    seed: int = 0
    name: str = "inverse_network"

    def reconstruct(self, observation, knowledge: Knowledge,
                    progress: Callable[[int, float], None] | None = None) -> Reconstruction:
        """``knowledge.model``: the client-side model to query; ``knowledge.auxiliary_inputs``: the
        attacker's data (normalised, shaped like the client's inputs)."""
        if knowledge.auxiliary_inputs is None:
            raise ValueError("inverse_network needs the attacker's auxiliary data (knowledge.auxiliary_inputs)")
        torch.manual_seed(self.seed)
        # a copy on the attack's device: knowledge.model stays where it is (see attacks/rmle.py)
        f = copy.deepcopy(knowledge.model).to(knowledge.device).eval()
        aux = knowledge.auxiliary_inputs.to(knowledge.device)
        with torch.no_grad():
            codes = f(aux).flatten(1)
        d_in, d_out = codes.shape[1], math.prod(knowledge.input_shape)
        g = nn.Sequential(nn.Linear(d_in, self.hidden), nn.ReLU(), nn.Linear(self.hidden, self.hidden), nn.ReLU(),
                          nn.Linear(self.hidden, d_out)).to(knowledge.device)
        opt = torch.optim.Adam(g.parameters(), lr=self.lr)
        gen = torch.Generator().manual_seed(self.seed)
        targets = aux.flatten(1)
        loss = torch.tensor(float("nan"))
        steps = 0
        for epoch in range(self.epochs):
            order = torch.randperm(len(aux), generator=gen).to(knowledge.device)  # drawn on the CPU
            for start in range(0, len(aux), self.batch_size):
                idx = order[start:start + self.batch_size]
                opt.zero_grad(set_to_none=True)
                loss = (g(codes[idx]) - targets[idx]).pow(2).mean()
                loss.backward()
                opt.step()
                steps += 1
            if progress is not None and (epoch + 1) % max(1, self.epochs // 10) == 0:
                progress(epoch + 1, float(loss))
        mean, std, low, high = knowledge.bounds()
        with torch.no_grad():
            x = g(observation.activations.to(knowledge.device).flatten(1)).view(-1, *knowledge.input_shape)
            images = (torch.max(torch.min(x, high), low) * std + mean).clamp(0, 1)
        labels = None if observation.labels is None else observation.labels.cpu()
        return Reconstruction(images.cpu(), labels, iterations=self.epochs, evaluations=steps, loss=float(loss),
                              info={"labels_given": labels is not None, "decoder_training_loss": float(loss)})
