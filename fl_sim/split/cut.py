"""Where a split model is cut and what crosses the cut: the client side and the server side of a
model (``scenario.cut_layer``, ``scenario.head_layer`` for the label-private U-shape), a client's
seeded batch plan of a round, the cut defenses on the activations it sends, and the optimiser state
that a client keeps between messages (as Flower records)."""

from __future__ import annotations

import numpy as np
import torch
from flwr.app import ArrayRecord
from omegaconf import DictConfig
from torch import nn

from defenses.cut import dropout_activations, noisy_activations
from defenses.dpsgd import sample_rate, steps_per_epoch
from fl_sim.config import ConfigError
from fl_sim.models import cut_points, layers, split_model
from fl_sim.sampling import round_seed

STATE_BOTTOM, STATE_OPTIMIZER = "split-bottom", "split-optimizer"
_NONLINEAR = (nn.ReLU, nn.Sigmoid, nn.Tanh, nn.GELU, nn.MaxPool2d)


def default_cut(model: nn.Module) -> str:
    """The cut used when ``scenario.cut_layer`` is not set: after the model's first non-linearity."""
    for name, layer in layers(model)[:-1]:
        if isinstance(layer, _NONLINEAR):
            return name
    return cut_points(model)[0]


def cut_of(cfg: DictConfig, model: nn.Module) -> str:
    return str(cfg.scenario.cut_layer) if cfg.scenario.cut_layer else default_cut(model)


def split(cfg: DictConfig, model: nn.Module) -> tuple[nn.ModuleDict, nn.Sequential]:
    """(client side, server side) sharing ``model``'s layers. The client side is ``{"bottom": ...}``, plus
    ``"head"`` in the label-private U-shape (``scenario.head_layer``: the client keeps the layers after it,
    and its labels). An invalid cut is a ConfigError naming the valid ones."""
    try:
        bottom, rest = split_model(model, cut_of(cfg, model))
    except ValueError as e:
        raise ConfigError(f"{e} (model={cfg.model.name})") from e
    head_layer = cfg.scenario.get("head_layer")
    if not head_layer:
        return nn.ModuleDict({"bottom": bottom}), rest
    names = [n for n, _ in layers(model)]
    after = names[names.index(cut_of(cfg, model)) + 1:-1]  # the server keeps at least one layer, the client too
    if head_layer not in after:
        raise ConfigError(f"scenario.head_layer={head_layer!r} is not a layer after the cut that leaves the client "
                          f"a head (model={cfg.model.name}); choose one of {', '.join(after) or '(none: cut earlier)'}")
    k = after.index(head_layer) + 1
    middle, head = nn.Sequential(*list(rest)[:k]), nn.Sequential(*list(rest)[k:])
    return nn.ModuleDict({"bottom": bottom, "head": head}), middle


def part(state: dict[str, torch.Tensor], part: str) -> dict[str, torch.Tensor]:
    return {k[len(part) + 1:]: v for k, v in state.items() if k.startswith(part + ".")}


def batch_plan(n: int, epochs: int, batch_size: int, seed: int, server_round: int, cid: int,
               poisson: bool = False) -> list[np.ndarray]:
    """The client's batches of a round, in order: a seeded permutation per epoch, cut in batches; with
    ``poisson`` (DP-SGD), as many Poisson draws of rate 1/ceil(n/batch_size) (Opacus' sampling)."""
    gen = torch.Generator().manual_seed(round_seed(seed, server_round, cid))
    if poisson:
        q = sample_rate(n, batch_size)
        return [torch.nonzero(torch.rand(n, generator=gen) < q).flatten().numpy()
                for _ in range(epochs * steps_per_epoch(n, batch_size))]
    plan = []
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen).numpy()
        plan += [order[s:s + batch_size] for s in range(0, n, batch_size)]
    return plan


def step_seed(seed: int, server_round: int, cid: int, step: int) -> int:
    return int(np.random.SeedSequence([seed, server_round, cid, step, 0xC7]).generate_state(1)[0])


def at_the_cut(cfg: DictConfig, a: torch.Tensor, server_round: int, cid: int, step: int) -> torch.Tensor:
    """The cut defenses on what the client sends (dropout, then noise), seeded by the step so that the
    client's recomputation of a batch sends the same thing."""
    d = cfg.defense
    gen = torch.Generator().manual_seed(step_seed(cfg.seed, server_round, cid, step))
    if d.cut_dropout:
        a = dropout_activations(a, float(d.cut_dropout_p), generator=gen)
    if d.cut_noise:
        a = noisy_activations(a, float(d.cut_noise_scale), str(d.cut_noise_kind), generator=gen)
    return a


def save_optimizer(opt: torch.optim.Optimizer) -> ArrayRecord:
    state = opt.state_dict()["state"]
    return ArrayRecord({f"{i}.{k}": (v if torch.is_tensor(v) else torch.tensor(v)).detach().cpu()
                        for i, s in state.items() for k, v in s.items()})


def load_optimizer(opt: torch.optim.Optimizer, record: ArrayRecord) -> None:
    state: dict[int, dict] = {}
    for key, v in record.to_torch_state_dict().items():
        i, k = key.split(".", 1)
        state.setdefault(int(i), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})
