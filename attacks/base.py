"""The attack interface: ``reconstruct(observation, knowledge) -> Reconstruction``.

An attack sees only what a server observes (``Observation``) and what it knows (``Knowledge``):
the model it sent, the hyper-parameters it sent, the number of examples the client reported.
It never sees the client's data. A model-inversion attack observes a trained model itself
(``ModelObservation``) and reconstructs representatives of its classes with the attacker's own
auxiliary data. Images are returned in [0, 1] (the attack works in the model's
normalised input space and maps back with ``knowledge.mean`` / ``knowledge.std``).

Pure PyTorch: usable on any ``(model, update)`` pair without Flower or fl_sim::

    from attacks import Observation, Knowledge, make_attack
    obs = Observation.from_gradients(model, grads)            # FedSGD: one gradient
    rec = make_attack("inverting_gradients", iterations=1000).reconstruct(obs, Knowledge(model, (3, 32, 32), 10))
"""

from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
from torch import nn


PRECISIONS = ("float32", "bfloat16")


def autocast(precision: str, device: str | torch.device = "cpu") -> contextlib.AbstractContextManager:
    """The arithmetic of an attack's forward passes. ``float32``: exact, as the papers compute.
    ``bfloat16``: PyTorch autocast, so that convolutions and matrix products run in bfloat16 (GMI: 1.3-1.6x
    measured on a CPU with AVX-512 BF16; recent GPUs support it, not measured here) while the optimised
    latents or images, the optimisers' state and the losses stay float32. No loss scaling is needed:
    bfloat16 has float32's range."""
    if precision == "float32":
        return contextlib.nullcontext()
    if precision == "bfloat16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    raise ValueError(f"precision={precision!r}: one of {', '.join(PRECISIONS)}")


@dataclass
class Observation:
    """What the server received.

    ``before``: the global state dict it sent; ``after``: the state dict it got back (one client's, or
    the aggregate under secure aggregation). ``kind`` is the DESIGN vocabulary: ``client_update`` or
    ``aggregate``.
    """

    before: dict[str, torch.Tensor]
    after: dict[str, torch.Tensor]
    kind: str = "client_update"

    @staticmethod
    def from_gradients(model: nn.Module, gradients: list[torch.Tensor], lr: float = 1.0) -> "Observation":
        """The FedSGD case: a client taking one SGD step of ``lr`` with these parameter gradients."""
        before = {k: v.detach().clone() for k, v in model.state_dict().items()}
        after = dict(before)
        names = [n for n, _ in model.named_parameters()]
        for n, g in zip(names, gradients):
            after[n] = before[n] - lr * g.detach()
        return Observation(before, after)

    def parameter_update(self, model: nn.Module) -> list[torch.Tensor]:
        """``before - after`` for each trainable parameter, in ``model.named_parameters()`` order."""
        return [(self.before[n] - self.after[n]).float() for n, _ in model.named_parameters()]


@dataclass
class ModelObservation:
    """A trained model as the attacker holds it (``observed: "model"``): its weights. The architecture
    is ``knowledge.model``; white-box access."""

    state: dict[str, torch.Tensor]
    kind: str = "model"


@dataclass
class Knowledge:
    """What the server knows besides the observation.

    ``model``: the architecture (its weights are replaced by ``observation.before``).
    Hyper-parameters the server sent: ``lr``, ``local_epochs``, ``batch_size``; what the client
    reported: ``num_examples``. ``labels``: the true labels when the threat model grants them
    (None: the attack recovers them). ``mean``/``std``: the input normalisation (per channel).
    """

    model: nn.Module
    input_shape: tuple[int, int, int]
    num_classes: int
    lr: float = 1.0
    local_epochs: int = 1
    batch_size: int = 1
    num_examples: int = 1
    labels: torch.Tensor | None = None
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    bn_stats_known: bool = False
    auxiliary_inputs: torch.Tensor | None = None  # the attacker's own data (normalised), e.g. for a decoder
    target_classes: tuple[int, ...] = ()  # model inversion: the classes to reconstruct (empty: every class)
    device: str = "cpu"

    @property
    def local_steps(self) -> int:
        return self.local_epochs * math.ceil(self.num_examples / self.batch_size)

    def bounds(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(mean, std, low, high) as (1, C, 1, 1) tensors; [low, high] is [0, 1] in normalised space."""
        c = self.input_shape[0]
        mean = torch.as_tensor(self.mean, dtype=torch.float32).expand(c).reshape(1, c, 1, 1).to(self.device)
        std = torch.as_tensor(self.std, dtype=torch.float32).expand(c).reshape(1, c, 1, 1).to(self.device)
        return mean, std, (0 - mean) / std, (1 - mean) / std

    def model_at(self, state: dict[str, torch.Tensor]) -> nn.Module:
        """A copy of the architecture holding ``state`` (the model the server sent)."""
        m = copy.deepcopy(self.model).to(self.device)
        m.load_state_dict({k: v.to(self.device) for k, v in state.items()})
        return m

    def frozen_model_at(self, state: dict[str, torch.Tensor]) -> nn.Module:
        """``model_at(state)`` in eval mode with its weights out of the gradients: a model under attack."""
        m = self.model_at(state).eval()
        for p in m.parameters():
            p.requires_grad_(False)
        return m

    def classes_to_reconstruct(self) -> tuple[int, ...]:
        """Model inversion: ``target_classes``, or every class of the model when none are named."""
        return tuple(self.target_classes) or tuple(range(self.num_classes))


@dataclass
class Reconstruction:
    """Reconstructed inputs in [0, 1] (B, C, H, W) and labels (B,) or None."""

    inputs: torch.Tensor
    labels: torch.Tensor | None
    iterations: int = 0
    evaluations: int = 0  # evaluations of the matching objective with its gradient
    loss: float = float("nan")
    info: dict = field(default_factory=dict)


class Attack(Protocol):
    name: str

    def reconstruct(self, observation: Observation, knowledge: Knowledge,
                    progress: Callable[[int, float], None] | None = None) -> Reconstruction: ...
