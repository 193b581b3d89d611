"""Sample-level DP-SGD for a client's local training, through Opacus (Abadi et al., "Deep Learning
with Differential Privacy", CCS 2016).

Each step draws a Poisson sample of the client's data (rate ``q = 1 / ceil(n / batch_size)``, so the
expected batch is the configured batch size), clips every example's gradient to ``max_grad_norm``,
sums, adds N(0, (σ·max_grad_norm)²) and averages by the expected batch size — Opacus'
``PrivacyEngine.make_private``. The round's privacy cost is the history entry ``(σ, q, steps)``;
the client composes it with its earlier rounds (``defenses.accounting``).

BatchNorm mixes examples of a batch and breaks per-example clipping: ``make_dp_compatible`` replaces
it (Opacus' ``ModuleValidator.fix``: GroupNorm) before the model is first built, so that every
party of the run uses the same architecture.
"""

from __future__ import annotations

import copy
import math
import warnings
from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

from defenses.inversion import seed_bottlenecks

GRAD_SAMPLE_MODES = ("hooks", "functorch", "ew", "ghost")
# grad_sample_mode=auto: the fastest mode whose clipped update matched hooks' (1e-4), as measured by
# benchmarks/dp_overhead.py on 2 CPU cores (mean private/plain epoch ratio over batch 64 and 256);
# models not measured use hooks, Opacus' default.
FASTEST_MODE = {"convnet": "functorch", "lenet": "hooks"}  # lenet: ew within 2-10% of hooks across runs


def resolve_grad_sample_mode(mode: str, model_name: str) -> str:
    return FASTEST_MODE.get(model_name, "hooks") if mode == "auto" else mode


def make_dp_compatible(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """Return (a model Opacus can train, what was changed): BatchNorm becomes GroupNorm."""
    from opacus.validators import ModuleValidator  # imported when used: Opacus takes seconds to import

    if not ModuleValidator.validate(model, strict=False):
        return model, []
    bn = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    fixed = ModuleValidator.fix(model)
    ModuleValidator.validate(fixed, strict=True)  # raises if something is still not private-trainable
    return fixed, [f"{bn} BatchNorm layer(s) replaced by GroupNorm (Opacus ModuleValidator.fix)"] if bn else \
        ["layers Opacus cannot train privately replaced (Opacus ModuleValidator.fix)"]


def sample_rate(num_examples: int, batch_size: int) -> float:
    """Opacus' Poisson rate for a loader of ``batch_size``: one over the number of batches."""
    return 1.0 / math.ceil(num_examples / batch_size)


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    return math.ceil(num_examples / batch_size)


def dp_local_train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    noise_multiplier: float,
    max_grad_norm: float,
    make_optimizer: Callable[..., torch.optim.Optimizer] | None = None,
    grad_sample_mode: str = "hooks",
    generator: torch.Generator | None = None,
    loss_fn: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> tuple[dict[str, torch.Tensor], float, int, float]:
    """DP-SGD on (x, y) starting from ``model``'s weights (``model`` itself is left untouched).

    ``make_optimizer(params)`` builds the client's optimiser (default: plain SGD at ``lr``); Opacus
    wraps it. Returns (trained state dict, mean training loss, steps taken, Poisson sample rate).
    ``generator`` seeds both the Poisson sampling and the noise (reproducible runs on CPU;
    Opacus' ``secure_mode`` is what a deployment would use instead). ``loss_fn(model, logits, y)``: the
    per-example loss (default cross-entropy; a model-inversion defense's, ``defenses.inversion``), which
    per-example clipping bounds as it bounds the cross-entropy; ``generator`` also draws the noise of a
    MID bottleneck.
    """
    n = len(x)
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    work = copy.deepcopy(model)
    work.train()
    seed_bottlenecks(work, gen)
    opt = make_optimizer(work.parameters()) if make_optimizer else torch.optim.SGD(work.parameters(), lr=lr)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch_size,
                                         generator=gen)
    device = next(work.parameters()).device
    # Opacus draws the noise where the parameters are, with this generator: on a GPU one of the GPU's,
    # seeded from ``gen`` (which keeps drawing the Poisson batches); on the CPU ``gen`` itself, as always
    noise_gen = gen if device.type == "cpu" else \
        torch.Generator(device=device).manual_seed(int(torch.randint(2**62, (1,), generator=gen)))
    from opacus import PrivacyEngine

    engine = PrivacyEngine(accountant="rdp")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG.*")
        warnings.filterwarnings("ignore", message=".*full backward hook.*")
        made = engine.make_private(
            module=work, optimizer=opt, data_loader=loader, noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm, poisson_sampling=True, grad_sample_mode=grad_sample_mode,
            noise_generator=noise_gen, criterion=nn.CrossEntropyLoss())
    if grad_sample_mode == "ghost":
        dp_model, dp_opt, criterion, dp_loader = made
    else:
        (dp_model, dp_opt, dp_loader), criterion = made, None
    total, counted, steps = 0.0, 0, 0
    for _ in range(epochs):
        for xb, yb in dp_loader:
            steps += 1  # every Poisson draw counts, also an empty one (its absence of data is not private)
            dp_opt.zero_grad(set_to_none=True)
            if criterion is not None:  # ghost clipping: its criterion runs the two backward passes
                if len(yb) == 0:
                    continue
                loss = criterion(dp_model(xb), yb)
                loss.backward()
                value = float(loss.detach())
            elif len(yb) == 0 and grad_sample_mode != "hooks":
                # an empty Poisson batch still makes a (pure noise) step; functorch's and expanded weights'
                # forward passes cannot take an empty batch: no per-sample gradient, as the hooks give it
                for param in dp_model.parameters():
                    if param.requires_grad:
                        param.grad_sample = torch.zeros((0, *param.shape), dtype=param.dtype, device=param.device)
                value = 0.0
            else:
                # sum / batch length == mean, and an empty Poisson batch still makes a (pure noise) step
                logits = dp_model(xb)
                per_example = F.cross_entropy(logits, yb, reduction="none") if loss_fn is None else \
                    loss_fn(dp_model, logits, yb)
                loss = per_example.sum() / max(len(yb), 1)
                loss.backward()
                value = float(loss.detach())
            dp_opt.step()
            if len(yb):
                total, counted = total + value, counted + 1
    q = sample_rate(n, batch_size)
    state = {k: v.detach().cpu().clone() for k, v in dp_model._module.state_dict().items()} \
        if hasattr(dp_model, "_module") else {k: v.detach().cpu().clone() for k, v in work.state_dict().items()}
    if hasattr(dp_model, "_close"):
        dp_model._close()
    return state, total / max(counted, 1), steps, q
