"""Label recovery from the classification head's update (no optimisation).

- ``idlg_label`` — Zhao, Mopuri, Bilen, "iDLG" (2020): with cross-entropy and one example,
  dL/dz_c = p_c - y_c is negative only for the true class, so the head's bias gradient (or the row
  sums of its weight gradient, the features being non-negative) is negative only there.
- ``batch_labels`` — label counts for a batch, bias-corrected (Geng et al. 2021, "Towards General
  Deep Leakage in Federated Learning"; Wainakh et al. 2022, LLG): with mean reduction the head's bias
  gradient is g_c = (1/B) sum_i (p_ic - y_ic), so the count of class c is B (p̄_c - g_c). The mean
  prediction p̄_c is estimated by running the model sent on random inputs. For a FedAvg update of E
  epochs over n examples in batches of b, the update (in gradient units) sums every step's gradient:
  about (E / b) sum_i (p_ic - y_ic), so count_c ≈ n p̄_c - (b / E) signal_c (p drifts as the client trains:
  an approximation).
"""

from __future__ import annotations

import torch
from torch import nn

from attacks.matching import last_linear


def _head_signal(model: nn.Module, update: dict[str, torch.Tensor]) -> tuple[torch.Tensor, bool]:
    """Per-class signal from the head's update (gradient units): bias gradient, else weight row sums."""
    name, head = last_linear(model)
    if head.bias is not None and f"{name}.bias" in update:
        return update[f"{name}.bias"].float(), True
    return update[f"{name}.weight"].float().sum(dim=1), False


def idlg_label(model: nn.Module, update: dict[str, torch.Tensor]) -> int:
    """The label of a single example: the one class with a negative head gradient."""
    signal, _ = _head_signal(model, update)
    return int(signal.argmin())


@torch.no_grad()
def mean_prediction(model: nn.Module, input_shape, num_samples: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean softmax, mean head-input feature sum) of the model on random (normalised-space) inputs."""
    g = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    x = torch.randn(num_samples, *input_shape, generator=g).to(device)
    _, head = last_linear(model)
    feats = []
    h = head.register_forward_hook(lambda m, i, o: feats.append(i[0].detach()))
    was_training = model.training
    model.eval()
    p = torch.softmax(model(x), dim=1).mean(0)
    model.train(was_training)
    h.remove()
    return p, feats[0].sum(dim=1).mean()


def batch_labels(model: nn.Module, update: dict[str, torch.Tensor], num_examples: int, input_shape,
                 num_classes: int, local_batch_size: int | None = None, epochs: int = 1) -> torch.Tensor:
    """Recover the multiset of ``num_examples`` labels (sorted) from the head's update in gradient units
    (one mean-reduced gradient, or the sum over the client's local steps)."""
    batch_size = num_examples
    b = min(local_batch_size or num_examples, num_examples)
    signal, is_bias = _head_signal(model, update)
    p_mean, feat_sum = mean_prediction(model, input_shape)
    if not is_bias:  # weight row sums carry the (unknown) feature sums; use their mean as the scale
        signal = signal / feat_sum.clamp_min(1e-8)
    counts = (batch_size * p_mean.to(signal.device) - signal * b / max(epochs, 1)).clamp_min(0)
    # integer counts summing to batch_size: floors, then the largest remainders (or, when clamping
    # negatives pushed the total over, take back from the smallest remainders)
    base = counts.floor()
    rem = counts - base
    while base.sum() < batch_size:
        i = int(torch.argmax(rem))
        base[i] += 1
        rem[i] = -1.0
    while base.sum() > batch_size:
        i = int(torch.argmin(torch.where(base > 0, counts - base + 1, torch.full_like(base, 1e9))))
        base[i] -= 1
    return torch.repeat_interleave(torch.arange(num_classes, device=base.device), base.long())
