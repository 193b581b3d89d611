"""Local training and evaluation: plain PyTorch loops shared by the ClientApp, the server's
central evaluation and the benchmarks' reference loop."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F


def resolve_device(device: str, gpu_assigned: bool = True) -> torch.device:
    """``auto`` -> cuda when available (and a GPU is assigned to this worker), else cpu."""
    if device == "auto":
        return torch.device("cuda" if gpu_assigned and torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device} but no CUDA device is visible; use device=cpu or device=auto")
    return torch.device(device)


def make_optimizer(name: str, params, lr: float, momentum: float = 0.0, weight_decay: float = 0.0):
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"client.optimizer={name} is not known; choose sgd or adam")


def local_train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    optimizer: str = "sgd",
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    proximal_mu: float = 0.0,
    generator: torch.Generator | None = None,
    loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> tuple[float, int]:
    """Train ``model`` in place on (x, y) for ``epochs``; return (mean training loss, steps taken).

    With ``proximal_mu > 0`` the FedProx term (mu/2)·||w - w_start||² is added to the loss
    (Li et al. 2020), w_start being the weights the model had on entry (the global model).
    ``loss_fn(model, logits, y)``: the per-example loss (default cross-entropy), e.g. a defense's.
    """
    model.train()
    opt = make_optimizer(optimizer, model.parameters(), lr, momentum, weight_decay)
    anchor = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else None
    n = len(x)
    total, steps = 0.0, 0
    for _ in range(epochs):
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            idx = order[start:start + batch_size]
            opt.zero_grad(set_to_none=True)
            logits = model(x[idx])
            loss = F.cross_entropy(logits, y[idx]) if loss_fn is None else loss_fn(model, logits, y[idx]).mean()
            if anchor is not None:
                prox = sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor))
                (loss + 0.5 * proximal_mu * prox).backward()
            else:
                loss.backward()
            opt.step()
            total += loss.item()
            steps += 1
    return total / max(steps, 1), steps


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> tuple[float, float]:
    """Return (mean cross-entropy, accuracy) of ``model`` on (x, y)."""
    model.eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, len(x), batch_size):
        xb, yb = x[start:start + batch_size], y[start:start + batch_size]
        out = model(xb)
        loss_sum += F.cross_entropy(out, yb, reduction="sum").item()
        correct += (out.argmax(1) == yb).sum().item()
    n = max(len(x), 1)
    return loss_sum / n, correct / n
