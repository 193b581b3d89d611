"""Training-time defenses against model inversion that change what each client minimises.

- **Label smoothing** with a signed factor α (Struppek, Hintersdorf, Kersting, "Be Careful What You
  Smooth For", ICLR 2024): the target of an example of class y is (1 − α)·onehot(y) + α/K. A positive α
  (the usual smoothing) is known to *help* model inversion; a negative one (α ≈ −0.05 in the paper)
  defends. Both signs are allowed, so that the trade-off can be measured.
- **MID** (Wang, Zhang, Zhao, Yu, Chen, "Improving Robustness to Model Inversion Attacks via Mutual
  Information Regularization", AAAI 2021): a variational information bottleneck (Alemi et al., VIB)
  replaces the classifier's last layer: h ↦ (μ, σ) = encoder(h), z = μ + σ·ε, logits = classifier(z),
  and the loss adds β·KL(N(μ, σ²) ‖ N(0, I)), which bounds the mutual information between the input and
  z. σ = softplus(s − 5) and the KL in bits, as the authors' code. In eval mode (the deployed model,
  central evaluation, the attacker's copy) z is drawn too, as in the authors' code, whose deployed model
  samples on every call (``sample_at_eval``; its noise is seeded by the bytes of the features it is given:
  a fresh draw for every new input, e.g. each step of an attack, and the same for the same input, so that
  runs and resumed runs are reproducible); ``sample_at_eval=False`` gives z = μ.
- **BiDO** (Peng, Liu, Zhou, Yu, Lin, Chen, Zhang, "Bilateral Dependency Optimization: Defending
  Against Model-inversion Attacks", KDD 2022): for every hidden layer Z_j, the loss adds
  λx·dep(X, Z_j) − λy·dep(Z_j, Y): hidden features should depend little on the input and much on the
  label. dep is COCO, the constrained covariance sqrt(‖K̃_A K̃_B‖_F)/m of the centred kernel matrices of
  the batch (Gaussian kernel of width σ·sqrt(d) for inputs and features, linear kernel of the one-hot
  labels), with the paper's MNIST setting (λx, λy) = (1, 50), σ = 5. The hidden layers here are the
  outputs of the model's activation layers (their MNIST network's are its three conv blocks').

MID's and label smoothing's losses are per example, so they stack with DP-SGD's per-example clipping;
BiDO's couples the examples of a batch, so it does not (the config refuses the pair). The noise of the
bottleneck is drawn from the training loop's seeded generator (``seed_bottlenecks``): the same seed
gives the same run.
"""

from __future__ import annotations

import hashlib
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

    def __init__(self, in_features: int, num_classes: int, dim: int, sample_at_eval: bool = False):
        super().__init__()
        self.dim = dim
        self.sample_at_eval = sample_at_eval
        self.encoder = nn.Linear(in_features, 2 * dim)
        self.classifier = nn.Linear(dim, num_classes)
        self.generator: torch.Generator | None = None  # set by seed_bottlenecks for a training run
        self.kl: torch.Tensor | None = None  # per example, in bits, of the last forward pass in training mode

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        stats = self.encoder(h)
        mu, std = stats[:, : self.dim], F.softplus(stats[:, self.dim:] - 5.0)
        if not self.training:  # the deployed model: no KL (nothing to regularise); z drawn, or its mean
            self.kl = None
            if not self.sample_at_eval:
                return self.classifier(mu)
            digest = hashlib.blake2b(h.detach().cpu().numpy().tobytes(), digest_size=8).digest()
            gen = torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)
            return self.classifier(mu + std * torch.randn(mu.shape, generator=gen).to(mu))
        self.kl = 0.5 * (mu ** 2 + std ** 2 - 2 * torch.log(std.clamp_min(1e-12)) - 1).sum(dim=1) / math.log(2)
        eps = torch.randn(mu.shape, generator=self.generator).to(mu) if self.generator is not None \
            else torch.randn_like(mu)
        return self.classifier(mu + std * eps)


def add_bottleneck(model: nn.Module, dim: int = 0, sample_at_eval: bool = False) -> nn.Module:
    """``model`` with its last fully connected layer (the classifier) replaced by a
    ``VariationalBottleneck`` of ``dim`` dimensions (0: half the layer's input width, as the authors'
    code; ``sample_at_eval``: the deployed model draws z, as theirs), in place; a ValueError when it has none."""
    named = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not named:
        raise ValueError("defense=mid puts its bottleneck in place of the model's last nn.Linear; this model has none")
    name, last = named[-1]
    parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    dim = dim or max(1, last.in_features // 2)
    setattr(parent, name.rsplit(".", 1)[-1],
            VariationalBottleneck(last.in_features, last.out_features, dim, sample_at_eval))
    return model


def bottlenecks(model: nn.Module) -> list[VariationalBottleneck]:
    return [m for m in model.modules() if isinstance(m, VariationalBottleneck)]


def seed_bottlenecks(model: nn.Module, generator: torch.Generator | None) -> None:
    """Draw the bottlenecks' noise from ``generator`` (the training loop's, seeded per round and client)."""
    for b in bottlenecks(model):
        b.generator = generator


ACTIVATIONS = (nn.ReLU, nn.LeakyReLU, nn.Sigmoid, nn.Tanh, nn.GELU, nn.ELU)


def centred_kernel(a: torch.Tensor, sigma: float | None) -> torch.Tensor:
    """H K H for the batch ``a`` (m, d): a Gaussian kernel exp(−‖a_i − a_j‖² / (2σ²d)), or linear with
    ``sigma`` None; H = I − 11ᵀ/m."""
    a = a.flatten(1)
    m = len(a)
    if sigma is None:
        k = a @ a.T
    else:
        sq = (a * a).sum(1)
        k = torch.exp(-(sq[:, None] - 2 * a @ a.T + sq[None, :]).clamp_min(0) / (2 * sigma ** 2 * a.shape[1]))
    h = torch.eye(m, dtype=a.dtype, device=a.device) - 1.0 / m
    return h @ k @ h


def coco(ka: torch.Tensor, kb: torch.Tensor) -> torch.Tensor:
    """BiDO's COCO of two centred kernel matrices of one batch: sqrt(‖K_a K_b‖_F) / m."""
    return torch.sqrt(torch.linalg.matrix_norm(ka @ kb)) / len(ka)


class BiDO:
    """BiDO's dependency term for ``model``: forward hooks keep the input and every activation layer's
    output of the forward pass; ``penalty(y, num_classes)`` turns the last pass into
    Σ_j λx·COCO(X, Z_j) − λy·COCO(Z_j, Y). ``close()`` removes the hooks."""

    def __init__(self, model: nn.Module, lambda_x: float = 1.0, lambda_y: float = 50.0, sigma: float = 5.0):
        self.lambda_x, self.lambda_y, self.sigma = lambda_x, lambda_y, sigma
        self.inputs: torch.Tensor | None = None
        self.hidden: list[torch.Tensor] = []
        layers = [m for m in model.modules() if isinstance(m, ACTIVATIONS)]
        if not layers:
            raise ValueError("defense=bido regularises the outputs of activation layers; this model has none")
        self._handles = [model.register_forward_pre_hook(self._input)] + \
            [m.register_forward_hook(self._output) for m in layers]

    def _input(self, module: nn.Module, args: tuple) -> None:
        self.inputs, self.hidden = args[0], []

    def _output(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self.hidden.append(output)

    def penalty(self, y: torch.Tensor, num_classes: int) -> torch.Tensor:
        kx = centred_kernel(self.inputs, self.sigma)
        ky = centred_kernel(F.one_hot(y, num_classes).to(kx.dtype), None)
        total = kx.new_zeros(())
        for z in self.hidden:
            kz = centred_kernel(z, self.sigma)
            total = total + self.lambda_x * coco(kx, kz) - self.lambda_y * coco(kz, ky)
        self.hidden = []
        return total

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def inversion_defense_loss(model: nn.Module, logits: torch.Tensor, y: torch.Tensor, *, alpha: float = 0.0,
                           beta: float = 0.0, bido: BiDO | None = None) -> torch.Tensor:
    """The training loss with these defenses, per example: smoothed cross-entropy (α), plus β times the
    bottleneck's KL of this forward pass (MID), plus BiDO's batch term (the same for every example of the
    batch, so that the batch mean is the mean cross-entropy plus the term)."""
    loss = smoothed_cross_entropy(logits, y, alpha)
    if beta:
        for b in bottlenecks(model):
            if b.kl is not None:
                loss = loss + beta * b.kl
                b.kl = None  # consumed: no graph kept on the module
    if bido is not None:
        loss = loss + bido.penalty(y, logits.shape[1])
    return loss
