"""What a malicious server does to the model it sends (``attack=imprint``): an imprint block in front
of the architecture, put back as it was built before every round. An honest server sends the model
unchanged. The attack itself (``attacks.imprint``) reads the update; this is the server's side of it."""

from __future__ import annotations

import math

import torch
from omegaconf import DictConfig

from attacks.imprint import ImprintBlock, ImprintedModel, measurement_thresholds, random_measurement
from fl_sim.data import FederatedData


def wrap_model(cfg: DictConfig, model: torch.nn.Module, data: FederatedData) -> torch.nn.Module:
    """The model a malicious server sends: with attack=imprint, an imprint block goes in front.
    Its bins sit at quantiles of a random linear measurement on the attacker's public data (the
    held-out test split)."""
    if cfg.attack.name != "imprint":
        return model
    shape = data.input_shape
    m = random_measurement(math.prod(shape), cfg.seed)
    thresholds = measurement_thresholds(torch.from_numpy(data.x_test), cfg.attack.bins, m)
    return ImprintedModel(model, ImprintBlock(shape, cfg.attack.bins, thresholds, measurement=m, seed=cfg.seed))


def malicious_rewrite(cfg: DictConfig, initial: dict[str, torch.Tensor]):
    """What a malicious server does to the global model before sending it: with imprint it puts its
    block back as it built it (one local step moves the block far, as the attack needs large
    updates; the server would otherwise send a broken model next round). None when honest."""
    if cfg.attack.name != "imprint":
        return None
    block = {k: v.detach().cpu().clone() for k, v in initial.items() if k.startswith("block.")}

    def rewrite(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: (block[k] if k in block else v) for k, v in state.items()}

    return rewrite
