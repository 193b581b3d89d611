"""What a malicious server does to the model it sends (``attack=imprint``): an imprint block in front
of the architecture. An honest server sends the model unchanged. The attack itself
(``attacks.imprint``) reads the update; this is the server's side of it.

Without secure aggregation the server sends the block to the clients it attacks only, in the rounds it
attacks (Fowl et al. 2022 target one user this way): the global model stays the honest architecture,
the other clients never see the block, and the server keeps only the model's own part of a targeted
client's reply (``untamper``). Under SecAgg+ every client of the protocol gets the same model, so the
block is part of the global model there (``wrap_model``) and is put back as built before every round
(``malicious_rewrite``)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from omegaconf import DictConfig

from attacks.imprint import ImprintBlock, ImprintedModel, measurement_thresholds, random_measurement
from fl_sim.data import FederatedData

BLOCK, BASE = "block.", "base."  # ImprintedModel's state: the block's arrays and the model's own


INJECTED_KEY = "participant-samples"  # attack=hitaj: what the active participant trains on besides its own data


def imprint_block(cfg: DictConfig, data: FederatedData) -> ImprintBlock:
    """The server's imprint block: bins at quantiles of a random linear measurement on the attacker's
    public data (the held-out test split)."""
    a = cfg.attack
    shape = data.input_shape
    m = random_measurement(math.prod(shape), cfg.seed)
    thresholds = measurement_thresholds(torch.from_numpy(data.x_test), a.bins, m)
    return ImprintBlock(shape, a.bins, thresholds, measurement=m, seed=cfg.seed, gain=float(a.gain),
                        strength=float(a.strength))


def wrap_model(cfg: DictConfig, model: torch.nn.Module, data: FederatedData) -> torch.nn.Module:
    """The global model: with attack=imprint under SecAgg+, the imprint block in front (every party);
    otherwise the model itself (the block travels in targeted messages only, ``tamper``)."""
    if cfg.attack.name != "imprint" or not cfg.defense.secagg:
        return model
    return ImprintedModel(model, imprint_block(cfg, data))


def tamper(cfg: DictConfig, data: FederatedData) -> Callable[[dict], dict] | None:
    """What the server does to the global model before sending it to a targeted client: the imprint
    block goes in front (its arrays ``block.*``, the model's own ``base.*``). None when honest, and
    under SecAgg+ (where the block is in the global model)."""
    if cfg.attack.name != "imprint" or cfg.defense.secagg:
        return None
    block = {BLOCK + k: v.detach().cpu().clone() for k, v in imprint_block(cfg, data).state_dict().items()}

    def send(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {**block, **{BASE + k: v for k, v in state.items()}}

    return send


def untamper(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What the server keeps of a reply to a tampered model: the model's own arrays, the block dropped
    (the other replies pass unchanged)."""
    if not any(k.startswith(BLOCK) for k in state):
        return state
    return {k[len(BASE):]: v for k, v in state.items() if k.startswith(BASE)}


def as_received(model: torch.nn.Module, state: dict[str, torch.Tensor],
                input_shape: tuple[int, ...]) -> torch.nn.Module:
    """The client's side: the model it was sent. ``model`` itself, or, when the arrays carry an imprint
    block, ``model`` behind a block of that shape (the client runs whatever architecture it receives)."""
    w = state.get(BLOCK + "imprint.weight")
    if w is None or isinstance(model, ImprintedModel):
        return model
    dev = next(model.parameters()).device
    return ImprintedModel(model, ImprintBlock(tuple(input_shape), int(w.shape[0]))).to(dev)


def malicious_rewrite(cfg: DictConfig, initial: dict[str, torch.Tensor]):
    """What a malicious server does to the global model before sending it, when the block is part of it
    (SecAgg+): it puts its block back as it built it (one local step moves the block far, as the attack
    needs large updates; the server would otherwise send a broken model next round). None otherwise."""
    if cfg.attack.name != "imprint" or not any(k.startswith(BLOCK) for k in initial):
        return None
    block = {k: v.detach().cpu().clone() for k, v in initial.items() if k.startswith(BLOCK)}

    def rewrite(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: (block[k] if k in block else v) for k, v in state.items()}

    return rewrite
