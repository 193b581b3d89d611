"""Training-time defenses against model inversion that change what each client minimises.

- **Label smoothing** with a signed factor α (Struppek, Hintersdorf, Kersting, "Be Careful What You
  Smooth For", ICLR 2024): the target of an example of class y is (1 − α)·onehot(y) + α/K. A positive α
  (the usual smoothing) is known to *help* model inversion; a negative one (α ≈ −0.05 in the paper)
  defends. Both signs are allowed, so that the trade-off can be measured.
- **MID** (Wang, Zhang, Zhao, Yu, Chen, "Improving Robustness to Model Inversion Attacks via Mutual
  Information Regularization", AAAI 2021): a variational information bottleneck (Alemi et al., VIB)
  replaces the classifier's last layer: h ↦ (μ, σ) = encoder(h), z = μ + σ·ε, logits = classifier(z),
  and the loss adds β·KL(N(μ, σ²) ‖ N(0, I)), which bounds the mutual information between the input and
  z. σ = softplus(s − 5) and the KL in bits, as the authors' code; in eval mode (the deployed model,
  central evaluation, the attacker's copy) z = μ.

Both losses are per example, so they stack with DP-SGD's per-example clipping. The noise of the
bottleneck is drawn from the training loop's seeded generator (``seed_bottlenecks``): the same seed
gives the same run.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


def smoothed_cross_entropy(logits: torch.Tensor, y: torch.Tensor, alpha: float = 0.0) -> torch.Tensor:
    """Cross-entropy to the targets (1 − α)·onehot(y) + α/K, per example; α may be negative."""
    if alpha == 0.0:
        return F.cross_entropy(logits, y, reduction="none")
    k = logits.shape[1]
    target = F.one_hot(y, k).to(logits.dtype) * (1.0 - alpha) + alpha / k
    return -(target * F.log_softmax(logits, dim=1)).sum(dim=1)


class VariationalBottleneck(nn.Module):
    """MID's bottleneck in place of a classifier layer ``in_features -> num_classes``."""

    def __init__(self, in_features: int, num_classes: int, dim: int):
        super().__init__()
        self.dim = dim
        self.encoder = nn.Linear(in_features, 2 * dim)
        self.classifier = nn.Linear(dim, num_classes)
        self.generator: torch.Generator | None = None  # set by seed_bottlenecks for a training run
        self.kl: torch.Tensor | None = None  # per example, in bits, of the last forward pass

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        stats = self.encoder(h)
        mu, std = stats[:, : self.dim], F.softplus(stats[:, self.dim:] - 5.0)
        self.kl = 0.5 * (mu ** 2 + std ** 2 - 2 * torch.log(std) - 1).sum(dim=1) / math.log(2)
        if not self.training:
            return self.classifier(mu)
        eps = torch.randn(mu.shape, generator=self.generator).to(mu) if self.generator is not None \
            else torch.randn_like(mu)
        return self.classifier(mu + std * eps)


def add_bottleneck(model: nn.Module, dim: int = 0) -> nn.Module:
    """``model`` with its last fully connected layer (the classifier) replaced by a
    ``VariationalBottleneck`` of ``dim`` dimensions (0: half the layer's input width, as the authors'
    code), in place; a ValueError when it has none."""
    named = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not named:
        raise ValueError("defense=mid puts its bottleneck in place of the model's last nn.Linear; this model has none")
    name, last = named[-1]
    parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    dim = dim or max(1, last.in_features // 2)
    setattr(parent, name.rsplit(".", 1)[-1], VariationalBottleneck(last.in_features, last.out_features, dim))
    return model


def bottlenecks(model: nn.Module) -> list[VariationalBottleneck]:
    return [m for m in model.modules() if isinstance(m, VariationalBottleneck)]


def seed_bottlenecks(model: nn.Module, generator: torch.Generator | None) -> None:
    """Draw the bottlenecks' noise from ``generator`` (the training loop's, seeded per round and client)."""
    for b in bottlenecks(model):
        b.generator = generator


def inversion_defense_loss(model: nn.Module, logits: torch.Tensor, y: torch.Tensor, *, alpha: float = 0.0,
                           beta: float = 0.0) -> torch.Tensor:
    """The per-example training loss with these defenses: smoothed cross-entropy (α), plus β times the
    bottleneck's KL of this forward pass (MID)."""
    loss = smoothed_cross_entropy(logits, y, alpha)
    if beta:
        for b in bottlenecks(model):
            if b.kl is not None:
                loss = loss + beta * b.kl
    return loss
