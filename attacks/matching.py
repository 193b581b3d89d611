"""Pieces shared by the gradient-matching attacks (dlg, idlg, inverting_gradients).

- ``UpdateSimulator``: the client's local training replayed on candidate data, differentiable
  with respect to that data. One SGD step (FedSGD) is the special case of ``steps=1``; several
  steps unroll the client's loop (Geiping et al. 2020, section 5). Its output is in gradient
  units, ``(before - after) / lr``, so that for one step it *is* the gradient.
- distances between updates (L2 for DLG, cosine for inverting gradients), total variation,
  and the BatchNorm statistics prior (Yin et al. 2021).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call
from torch.nn import functional as F

from attacks.base import Knowledge, Observation


class UpdateSimulator:
    """Replays a client's local SGD on candidate data (x, y): returns the update in gradient units.

    ``train_mode``: BatchNorm uses batch statistics (as a client training does); False: eval mode
    (the usual FedSGD benchmark setting).
    """

    def __init__(self, model: nn.Module, knowledge: Knowledge, train_mode: bool = True):
        self.model = model.train(train_mode)
        self.names = [n for n, _ in model.named_parameters()]
        self.params = {n: p.detach().requires_grad_(True) for n, p in model.named_parameters()}
        self.buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
        self.lr = knowledge.lr
        self.steps = knowledge.local_steps
        self.batch_size = knowledge.batch_size

    def target(self, observation: Observation) -> list[torch.Tensor]:
        return [(observation.before[n] - observation.after[n]).float().to(self.params[n].device) / self.lr
                for n in self.names]

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        """``y``: class indices (N,) or class probabilities (N, C)."""
        params = dict(self.params)
        buffers = {k: v.clone() for k, v in self.buffers.items()}
        n = len(x)
        batches = [slice(s, min(s + self.batch_size, n)) for s in range(0, n, self.batch_size)]
        batches = batches * max(1, self.steps // len(batches))  # epochs: the client's order is unknown
        for idx in batches:
            out = functional_call(self.model, (params, buffers), (x[idx],))
            loss = F.cross_entropy(out, y[idx])
            grads = torch.autograd.grad(loss, [params[k] for k in self.names], create_graph=True)
            if len(batches) == 1:
                return list(grads)
            params = {k: params[k] - self.lr * g for k, g in zip(self.names, grads)}
        return [(self.params[k] - params[k]) / self.lr for k in self.names]


def l2_distance(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    """DLG's objective: squared Euclidean distance summed over layers."""
    return sum(((x - y) ** 2).sum() for x, y in zip(a, b))


def cosine_distance(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    """Inverting gradients' objective: 1 - cosine similarity of the concatenated updates."""
    dot = sum((x * y).sum() for x, y in zip(a, b))
    na = sum((x * x).sum() for x in a).sqrt()
    nb = sum((y * y).sum() for y in b).sqrt()
    return 1 - dot / (na * nb + 1e-12)


def total_variation(x: torch.Tensor) -> torch.Tensor:
    """Anisotropic total variation, mean absolute difference of neighbours (Geiping et al.)."""
    dx = (x[:, :, :, :-1] - x[:, :, :, 1:]).abs().mean()
    dy = (x[:, :, :-1, :] - x[:, :, 1:, :]).abs().mean()
    return dx + dy


class BatchNormPrior:
    """Yin et al. 2021 (GradInversion): match the batch statistics the BatchNorm layers see on
    the candidate data to target statistics (``targets``: one (mean, var) pair per BN layer)."""

    def __init__(self, model: nn.Module, targets: list[tuple[torch.Tensor, torch.Tensor]]):
        self.layers = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        self.targets = targets
        self.seen: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.handles = [m.register_forward_hook(self._hook) for m in self.layers]

    def _hook(self, module, inputs, output):
        x = inputs[0]
        dims = [0] + list(range(2, x.dim()))
        self.seen.append((x.mean(dims), x.var(dims, unbiased=True)))  # as BatchNorm's running_var records it

    def reset(self) -> None:
        self.seen = []

    def loss(self) -> torch.Tensor:
        pairs = list(zip(self.seen[: len(self.targets)], self.targets))
        total = sum((m - tm).norm() + (v - tv).norm() for (m, v), (tm, tv) in pairs)
        return total if pairs else torch.zeros(())

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def batchnorm_targets(model: nn.Module, observation: Observation, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Target BN statistics, solved from the running-stat buffers of the client's returned model.

    After k steps with momentum m, running = (1 - m)^k old + sum_j m (1 - m)^(k-1-j) batch_j; taking every
    batch statistic equal to the client's data statistic s gives s = (running - (1 - m)^k old) / (1 - (1 - m)^k),
    exact for one step. Without a momentum (cumulative averaging) the running statistics of the model sent are
    used instead (GradInversion's prior from a trained model).
    """
    targets = []
    for name, m in model.named_modules():
        if not isinstance(m, nn.modules.batchnorm._BatchNorm):
            continue
        device = m.running_mean.device if m.running_mean is not None else None  # the model's (the attack's) device
        rm0 = observation.before[f"{name}.running_mean"].float().to(device)
        rv0 = observation.before[f"{name}.running_var"].float().to(device)
        if m.momentum and f"{name}.running_mean" in observation.after:
            keep = (1 - m.momentum) ** steps
            rm1 = observation.after[f"{name}.running_mean"].float().to(device)
            rv1 = observation.after[f"{name}.running_var"].float().to(device)
            targets.append(((rm1 - keep * rm0) / (1 - keep), ((rv1 - keep * rv0) / (1 - keep)).clamp_min(0)))
        else:
            targets.append((rm0, rv0))
    return targets


def last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    """The classification head: the last nn.Linear in module order."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise ValueError("the model has no linear layer to read labels from")
    return found[-1]
