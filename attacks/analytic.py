"""Analytic input recovery from a fully connected layer — Phong et al. 2017 ("Privacy-preserving deep
learning via additively homomorphic encryption"), the observation behind Fowl et al. 2022 and
R-GAP (Zhu & Blaschko 2021).

For a first layer z = W x + b, every row i has dL/dW_i = (dL/dz_i) x and dL/db_i = dL/dz_i, so one
example is recovered exactly: x = dL/dW_i / dL/db_i. We use the least-squares combination of all
rows, x = sum_i g_b,i g_W,i / sum_i g_b,i², exact for one example and one local step.

For a batch each row mixes the examples that activate it; rows reached by a single example still
give it exactly. We return the ``num_examples`` most distinct row candidates that are valid images
(inside the data range) and let the scoring say how much was recovered. For several local steps the
update is a sum of gradients at different weights and the ratio is an approximation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from attacks.base import Knowledge, Observation, Reconstruction


def first_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            return name, m
        if isinstance(m, (nn.Conv2d, nn.Conv1d)):
            break
    raise ValueError("the analytic attack needs a model whose first layer is fully connected (e.g. model=mlp)")


@dataclass
class Analytic:
    eps: float = 1e-10
    name: str = "analytic"

    def reconstruct(self, observation: Observation, knowledge: Knowledge,
                    progress: Callable[[int, float], None] | None = None) -> Reconstruction:
        model = knowledge.model_at(observation.before)
        name, layer = first_linear(model)
        if layer.bias is None:
            raise ValueError("the analytic attack needs the first linear layer to have a bias")
        dev = knowledge.device
        gw = (observation.before[f"{name}.weight"].to(dev) - observation.after[f"{name}.weight"].to(dev)).double()
        gb = (observation.before[f"{name}.bias"].to(dev) - observation.after[f"{name}.bias"].to(dev)).double()
        mean, std, low, high = knowledge.bounds()
        shape = (-1, *knowledge.input_shape)
        n = knowledge.num_examples
        if n == 1:
            x = (gb[:, None] * gw).sum(0) / (gb ** 2).sum().clamp_min(self.eps)
            xs = x.float().reshape(shape)
        else:
            rows = gb.abs() > self.eps * gb.abs().max()
            cands = (gw[rows] / gb[rows, None]).float().reshape(shape)
            inside = ((cands >= low - 1e-3) & (cands <= high + 1e-3)).flatten(1).float().mean(1)
            cands = cands[inside > 0.99] if (inside > 0.99).any() else cands[inside.argsort(descending=True)[:n]]
            xs = _most_distinct(cands, n)
        images = (xs.to(mean.device) * std + mean).clamp(0, 1)
        return Reconstruction(images.cpu(), None, iterations=0, evaluations=0, loss=0.0,
                              info={"layer": name})


def _most_distinct(cands: torch.Tensor, k: int) -> torch.Tensor:
    """Greedy farthest-point selection of k candidates (duplicates of one example collapse)."""
    flat = cands.flatten(1)
    chosen = [0]
    dist = (flat - flat[0]).norm(dim=1)
    while len(chosen) < min(k, len(flat)):
        i = int(dist.argmax())
        chosen.append(i)
        dist = torch.minimum(dist, (flat - flat[i]).norm(dim=1))
    return cands[chosen]
