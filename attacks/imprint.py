"""Imprint ("Robbing the Fed") — Fowl, Geiping, Czaja, Goldblum, Goldstein, "Robbing the Fed: Directly
Obtaining Private Data in Federated Learning with Modified Models" (ICLR 2022).

A malicious server puts an *imprint block* in front of the model it sends:

    h = ReLU(W1 x + b1),  W1_i = g m (the same linear measurement m for every bin; gain g),
                          b1_i = -g t_i (thresholds t_1 < ... < t_k at quantiles of that measurement)
    x' = x + reshape(W2 h), all columns of W2 equal (so dL/dh_i is the same for every bin)

Unit i is active for the examples whose measurement m.x exceeds t_i, so dL/dW1_i = sum_{n: s_n > t_i} c_n x_n
and dL/db1_i = sum_{n: s_n > t_i} c_n. The difference of two neighbouring bins isolates the examples
with t_i < s_n <= t_{i+1}; when that is one example, x_n = ΔW / Δb exactly (their eq. 3). It works on an
aggregate of many clients as well (the sum keeps the structure), which is why secure aggregation
does not stop it. The skip connection keeps the model working for the clients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from attacks.base import Knowledge, Observation, Reconstruction


class ImprintBlock(nn.Module):
    """The malicious module, placed in front of the model.

    Every bin measures the same random linear function of the input, ``m . x`` (the paper allows any
    linear measurement; a random direction separates examples better than mean brightness, which ties
    on images with few grey levels). ``thresholds`` are quantiles of that measurement on the server's
    public data (``measurement_thresholds``). ``gain`` scales the first layer down and the second up by
    the same amount: the model computes the same function, but the update of the first layer grows
    with the second layer's scale, so it survives the float32 subtraction ``before - after`` a server
    sees and SecAgg+'s quantisation of the aggregate (step 16 / 2^22 with Flower's defaults). Measured
    on 479 digits of one client (lr 0.1) and a quantised mean of 3 x 479 (lr 0.5), 1024 bins, examples
    recovered exactly (PSNR > 50 dB): gain 1: 0; gain 1e-3: 214, but 0 from the aggregate; gain 1e-7:
    212 and 244."""

    def __init__(self, input_shape: tuple[int, ...], num_bins: int, thresholds: torch.Tensor | None = None,
                 measurement: torch.Tensor | None = None, seed: int = 0, gain: float = 1e-7,
                 strength: float = 1e-2):
        super().__init__()
        self.input_shape = tuple(input_shape)
        d = math.prod(input_shape)
        g = torch.Generator().manual_seed(seed)
        if measurement is None:
            measurement = random_measurement(d, seed)
        if thresholds is None:  # quantiles of N(0, 1): the measurement of standardised data, roughly
            q = torch.linspace(0, 1, num_bins + 2)[1:-1]
            thresholds = torch.distributions.Normal(0.0, 1.0).icdf(q)
        self.imprint = nn.Linear(d, num_bins)
        self.project = nn.Linear(num_bins, d, bias=False)
        with torch.no_grad():
            self.imprint.weight.copy_(gain * measurement.reshape(1, d).expand(num_bins, d))
            self.imprint.bias.copy_(-gain * torch.as_tensor(thresholds, dtype=torch.float32))
            # the sum of the bins' activations is about num_bins * gain; keep x' - x around `strength`
            v = torch.randn(d, 1, generator=g) * strength / (gain * num_bins)
            self.project.weight.copy_(v.expand(d, num_bins))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.imprint(x.flatten(1)))
        return x + self.project(h).view(-1, *self.input_shape)


def random_measurement(d: int, seed: int = 0) -> torch.Tensor:
    """The block's linear measurement: a seeded random unit direction in input space."""
    m = torch.randn(d, generator=torch.Generator().manual_seed(seed + 1))
    return m / m.norm()


class ImprintedModel(nn.Module):
    """``base`` with an imprint block in front: the model a malicious server sends."""

    def __init__(self, base: nn.Module, block: ImprintBlock):
        super().__init__()
        self.block = block
        self.base = base

    def forward(self, x):
        return self.base(self.block(x))


def measurement_thresholds(images_normalised: torch.Tensor, num_bins: int, measurement: torch.Tensor) -> torch.Tensor:
    """Bin thresholds at the quantiles of the measurement on the attacker's auxiliary (public) data:
    about equally many examples fall in each bin, which maximises the bins holding exactly one."""
    s = images_normalised.flatten(1).double() @ measurement.double()
    q = torch.linspace(0, 1, num_bins + 2, dtype=torch.float64)[1:-1]
    return torch.quantile(s, q).float()


@dataclass
class Imprint:
    eps: float = 1e-12
    block_name: str = "block.imprint"
    name: str = "imprint"

    def reconstruct(self, observation: Observation, knowledge: Knowledge,
                    progress: Callable[[int, float], None] | None = None) -> Reconstruction:
        w, b = f"{self.block_name}.weight", f"{self.block_name}.bias"
        if w not in observation.before:
            raise ValueError("imprint needs the model sent to carry the imprint block (attack=imprint builds it)")
        dev = knowledge.device
        gw = (observation.before[w].to(dev) - observation.after[w].to(dev)).double()
        gb = (observation.before[b].to(dev) - observation.after[b].to(dev)).double()
        # thresholds ascending = bins ordered; b = -t so sort by -b
        order = torch.argsort(-observation.before[b].to(dev).double())
        gw, gb = gw[order], gb[order]
        dw = torch.cat([gw[:-1] - gw[1:], gw[-1:]])
        db = torch.cat([gb[:-1] - gb[1:], gb[-1:]])
        keep = db.abs() > self.eps * max(float(db.abs().max()), 1e-30)
        xs = (dw[keep] / db[keep, None]).float().reshape(-1, *knowledge.input_shape)
        mean, std, _, _ = knowledge.bounds()
        images = (xs.to(mean.device) * std + mean).clamp(0, 1)
        return Reconstruction(images.cpu(), None, iterations=0, evaluations=0, loss=0.0,
                              info={"bins_hit": int(keep.sum())})
