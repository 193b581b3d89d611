"""DeepInversion — Yin, Molchanov, Alvarez, Li, Mallya, Hoiem, Jha and Kautz, "Dreaming to Distill:
Data-free Knowledge Transfer via DeepInversion" (CVPR 2020). Data-free: no auxiliary data; the prior is
the model itself. Every BatchNorm layer stores the running mean and variance of the features that
training data produced there; DeepInversion optimises a batch of inputs so that their features have
those statistics, while the model puts each input in its target class (their eq. 3–4):

    min_x  CE(T(x), y) + α_tv · R_TV(x) + α_l2 · ||x||² + α_f · Σ_l ( ||μ_l(x) − μ_l^BN||₂ + ||σ²_l(x) − σ²_l^BN||₂ )

The defaults are those of the authors' CIFAR-10 script (``deepinversion_cifar10.py``, "paper
parameters"): Adam lr 0.05, α_f = 10, TV (L2) weight 2.5e-5, no L2 term, 2,000 iterations, inputs
initialised from a standard normal in the model's normalised space. Only models with BatchNorm layers
can be inverted this way (a ValueError says so otherwise); under DP-SGD fl-sim's models have GroupNorm.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from attacks.base import Knowledge, ModelObservation, Reconstruction, autocast


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _tv_l2(x: torch.Tensor) -> torch.Tensor:
    return ((x[:, :, 1:, :] - x[:, :, :-1, :]) ** 2).mean() + ((x[:, :, :, 1:] - x[:, :, :, :-1]) ** 2).mean()


@dataclass
class DeepInversion:
    iterations: int = 2000
    lr: float = 0.05
    bn_weight: float = 10.0
    tv: float = 2.5e-5
    l2: float = 0.0
    per_class: int = 5
    precision: str = "float32"  # bfloat16: autocast the target's forward pass (attacks.base.autocast)
    seed: int = 0
    name: str = field(default="deepinversion", init=False)

    def reconstruct(self, observation: ModelObservation, knowledge: Knowledge,
                    progress: Callable[[int, float], None] | None = None) -> Reconstruction:
        target = knowledge.frozen_model_at(observation.state)
        if not has_batchnorm(target):
            raise ValueError("deepinversion matches the statistics stored in BatchNorm layers, and this model has "
                             "none; use a model with BatchNorm (e.g. convnet, resnet18) or another attack")
        stats: list[torch.Tensor] = []

        def match(module: nn.modules.batchnorm._BatchNorm, inputs, _output) -> None:
            a = inputs[0].float()  # the statistics in float32 whatever the forward pass's precision
            dims = [0] + list(range(2, a.dim()))
            mu, var = a.mean(dims), a.var(dims, unbiased=False)
            stats.append(torch.norm(mu - module.running_mean, 2) + torch.norm(var - module.running_var, 2))

        hooks = [m.register_forward_hook(match) for m in target.modules()
                 if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        mean, std, low, high = knowledge.bounds()
        classes = knowledge.classes_to_reconstruct()
        y = torch.tensor(classes, dtype=torch.long).repeat_interleave(self.per_class).to(knowledge.device)
        gen = torch.Generator().manual_seed(self.seed)
        x = torch.randn(len(y), *knowledge.input_shape, generator=gen).to(knowledge.device).requires_grad_(True)
        opt = torch.optim.Adam([x], lr=self.lr)
        loss = torch.tensor(float("nan"))
        try:
            for it in range(self.iterations):
                stats.clear()
                with autocast(self.precision, knowledge.device):
                    logits = target(x).float()
                loss = F.cross_entropy(logits, y) + self.bn_weight * sum(stats) + self.tv * _tv_l2(x) \
                    + self.l2 * x.pow(2).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                with torch.no_grad():
                    x.copy_(torch.max(torch.min(x, high), low))  # stay a valid image
                if progress is not None and (it + 1) % max(1, self.iterations // 10) == 0:
                    progress(it + 1, float(loss.detach()))
        finally:
            for h in hooks:
                h.remove()
        images = (x.detach() * std + mean).clamp(0, 1).cpu()
        return Reconstruction(images, y.cpu(), iterations=self.iterations, evaluations=self.iterations,
                              loss=float(loss.detach()))
