"""FSHA — the feature-space hijacking attack of a malicious split-learning server, Pasquini, Ateniese
and Bernaschi, "Unleashing the Tiger: Inference Attacks on Split Learning" (CCS 2021); the losses and
the update order follow the authors' released code (github.com/pasquini-dario/SplitNN_FSHA, ``FSHA.py``).

The server does not train the task. It holds auxiliary data ``X_pub`` from the client's distribution
and trains three networks of its own:

- a pilot encoder ``f̃`` whose output has the shape of the client's activations at the cut; it defines
  the target feature space Z̃;
- a decoder ``f̃⁻¹`` with ``f̃⁻¹(f̃(x_pub)) ≈ x_pub`` (``d(f̃⁻¹(f̃(X_pub)), X_pub)``, MSE);
- a critic ``D`` on feature space, telling ``f̃(x_pub)`` from the client's ``f(x_priv)``; the WGAN-GP
  form the authors run: ``L_D = mean D(f̃(x_pub)) - mean D(f(x_priv)) + λ · GP``.

For every batch the client sends, ``a = f(x_priv)``, the server returns — instead of the gradient of
the task loss — the gradient of ``L_f = mean D(a)`` with respect to ``a`` (the WGAN generator loss).
The client back-propagates it through ``f`` and steps its optimiser, which moves ``f``'s output into
Z̃. Once there, ``f̃⁻¹(a)`` reconstructs the private input: no per-example optimisation at attack time.

As in the authors' code, ``f̃`` and ``f̃⁻¹`` are trained only as an autoencoder on ``X_pub``; the adversarial
term acts on the client's ``f`` alone (``f̃`` fixes the target, ``f`` is pulled into it).

Usage, one call per client batch (the client side in three lines)::

    fsha = FSHA(); fsha.setup(bottom, (1, 28, 28), x_public)
    a = bottom(x); a.backward(fsha.hijack(a)); client_optimiser.step()
    rec = fsha.reconstruct(ActivationObservation(bottom(x_new)), knowledge)
"""

from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from attacks.base import Knowledge, Reconstruction


_INIT_SEED_OFFSET = 7919


def _mlp(d_in: int, hidden: int, d_out: int, activation: Callable[[], nn.Module]) -> nn.Sequential:
    """Flatten, two hidden layers, linear output: works on 2-D and 4-D features alike."""
    return nn.Sequential(nn.Flatten(), nn.Linear(d_in, hidden), activation(), nn.Linear(hidden, hidden), activation(),
                         nn.Linear(hidden, d_out))


def _reinitialised(model: nn.Module) -> nn.Module:
    """A copy of the client's architecture with fresh weights: the server does not know the client's."""
    pilot = copy.deepcopy(model).cpu()  # reset on the CPU: the seeded, forked generator; the same init on any device
    for m in pilot.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    for p in pilot.parameters():
        p.requires_grad_(True)
    return pilot.train()


@dataclass
class FSHA:
    # Defaults of the authors' released MNIST setting (SplitNN_FSHA, FSHA.ipynb: WGAN, gradient_penalty
    # 500, lr_tilde 1e-5, lr_D 1e-4, batch 64, Adam, 10,000 iterations). The client's own learning rate
    # (their lr_f = 1e-5) is the client's, not the server's, so it is not a parameter here.
    lr_encoder: float = 1e-5  # Adam, f̃ and f̃⁻¹ together ("lr_tilde")
    lr_discriminator: float = 1e-4  # Adam, the critic D ("lr_D")
    gradient_penalty: float = 500.0  # weight of the WGAN-GP term (Gulrajani et al. use 10; FSHA uses 500)
    hidden: int = 256  # width of the MLP decoder's and critic's hidden layers (the paper's nets are convolutional)
    batch_size: int = 64  # auxiliary batch per step
    seed: int = 0
    name: str = "fsha"
    steps: int = field(default=0, init=False)  # hijack calls so far
    last: dict = field(default_factory=dict, init=False, repr=False)  # the losses of the latest step

    def setup(self, client_model: nn.Module, input_shape: tuple[int, int, int], auxiliary_inputs: torch.Tensor,
              device: str = "cpu") -> None:
        """Build f̃ (``client_model``'s architecture, re-initialised: its weights are not used), f̃⁻¹ and D.

        ``auxiliary_inputs``: the server's public data, normalised like the client's, shaped
        ``(N, *input_shape)``.
        """
        input_shape = tuple(int(s) for s in input_shape)
        if auxiliary_inputs.dim() != 4 or tuple(auxiliary_inputs.shape[1:]) != input_shape:
            raise ValueError(f"fsha needs auxiliary_inputs shaped (N, {', '.join(map(str, input_shape))}); "
                             f"got {tuple(auxiliary_inputs.shape)}")
        self._device = device
        self._input_shape = input_shape
        self._aux = auxiliary_inputs.detach().float().to(device)
        self._gen = torch.Generator().manual_seed(self.seed)
        with torch.random.fork_rng(devices=[]):  # seeded initialisation, the caller's RNG left untouched
            # offset: a run that seeds the client's model with the same number must not hand the pilot
            # the client's initial weights (which the server does not know)
            torch.manual_seed(self.seed + _INIT_SEED_OFFSET)
            self._pilot = _reinitialised(client_model).to(device)
            with torch.no_grad():
                self._feature_shape = tuple(self._pilot.eval()(self._aux[:2]).shape[1:])
            self._pilot.train()
            d_z, d_x = math.prod(self._feature_shape), math.prod(input_shape)
            self._decoder = _mlp(d_z, self.hidden, d_x, nn.ReLU).to(device)
            self._critic = _mlp(d_z, self.hidden, 1, functools.partial(nn.LeakyReLU, 0.2)).to(device)
        self._opt_autoencoder = torch.optim.Adam([*self._pilot.parameters(), *self._decoder.parameters()],
                                                 lr=self.lr_encoder)
        self._opt_critic = torch.optim.Adam(self._critic.parameters(), lr=self.lr_discriminator)
        self.steps = 0
        self.last = {}

    def state_dict(self) -> dict:
        """Everything the attack has learned so far (networks, optimisers, sampler), for checkpoints."""
        self._require_setup("state_dict")
        return {"pilot": self._pilot.state_dict(), "decoder": self._decoder.state_dict(),
                "critic": self._critic.state_dict(), "opt_autoencoder": self._opt_autoencoder.state_dict(),
                "opt_critic": self._opt_critic.state_dict(), "generator": self._gen.get_state(), "steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state_dict()`` (after ``setup`` with the same architecture and data)."""
        self._require_setup("load_state_dict")
        self._pilot.load_state_dict(state["pilot"])
        self._decoder.load_state_dict(state["decoder"])
        self._critic.load_state_dict(state["critic"])
        self._opt_autoencoder.load_state_dict(state["opt_autoencoder"])
        self._opt_critic.load_state_dict(state["opt_critic"])
        self._gen.set_state(state["generator"])
        self.steps = int(state["steps"])

    def _require_setup(self, what: str) -> None:
        if getattr(self, "_decoder", None) is None:
            raise ValueError(f"fsha.{what}() needs fsha.setup(client_model, input_shape, auxiliary_inputs) first: "
                             "the pilot encoder, decoder and critic are built there")

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        return self._decoder(z).view(-1, *self._input_shape)

    def _penalty(self, z_private: torch.Tensor, z_public: torch.Tensor) -> torch.Tensor:
        """Gulrajani et al.'s gradient penalty: (||∇D(ẑ)|| - 1)² on points between the two feature sets, the
        norm taken over all of a feature map (the authors' TF code leaves the channel axis out of it)."""
        n = min(len(z_private), len(z_public))
        eps = torch.rand((n,) + (1,) * (z_private.dim() - 1), generator=self._gen).to(self._device)
        z_hat = (eps * z_private[:n] + (1 - eps) * z_public[:n]).requires_grad_(True)
        (grad,) = torch.autograd.grad(self._critic(z_hat).sum(), z_hat, create_graph=True)
        return (grad.flatten(1).norm(dim=1) - 1).pow(2).mean()

    def hijack(self, activations: torch.Tensor) -> torch.Tensor:
        """One FSHA step on one received batch ``a = f(x_priv)``: returns ∂ mean D(a) / ∂a, the gradient the
        malicious server sends back instead of the task's; then trains f̃, f̃⁻¹ (on an auxiliary batch) and D
        (on that batch and ``a``). All three losses use the networks as they were when ``a`` arrived, as in
        the authors' code."""
        self._require_setup("hijack")
        if tuple(activations.shape[1:]) != self._feature_shape:
            raise ValueError(f"fsha was set up for activations shaped (B, {', '.join(map(str, self._feature_shape))}); "
                             f"got {tuple(activations.shape)}")
        z_private = activations.detach().float().to(self._device).requires_grad_(True)

        # (c) the client's loss L_f = mean D(f(x_priv)): its gradient w.r.t. the activations goes back
        adversarial = self._critic(z_private).mean()
        (grad,) = torch.autograd.grad(adversarial, z_private)
        z_private = z_private.detach()

        # (a) f̃ and f̃⁻¹ as an autoencoder on a public batch
        x_public = self._aux[torch.randint(len(self._aux), (self.batch_size,), generator=self._gen).to(self._device)]
        z_public = self._pilot(x_public)
        reconstruction = (self._decode(z_public) - x_public).pow(2).mean()
        self._opt_autoencoder.zero_grad(set_to_none=True)
        reconstruction.backward()
        self._opt_autoencoder.step()

        # (b) the critic, WGAN-GP: low on f̃(x_pub) (the target space), high on f(x_priv)
        z_public = z_public.detach()
        wasserstein = self._critic(z_public).mean() - self._critic(z_private).mean()
        critic_loss = wasserstein + self.gradient_penalty * self._penalty(z_private, z_public)
        self._opt_critic.zero_grad(set_to_none=True)
        critic_loss.backward()
        self._opt_critic.step()

        self.steps += 1
        self.last = {"adversarial_loss": float(adversarial.detach()),
                     "public_reconstruction_loss": float(reconstruction.detach()),
                     "critic_loss": float(critic_loss.detach())}
        return grad.to(device=activations.device, dtype=activations.dtype)

    def reconstruct(self, observation, knowledge: Knowledge,
                    progress: Callable[[int, float], None] | None = None) -> Reconstruction:
        """``observation``: an ``attacks.rmle.ActivationObservation``; returns ``f̃⁻¹(a)`` in [0, 1].

        ``knowledge`` supplies the input normalisation (``mean``/``std``); ``knowledge.model`` is not
        used (the decoder was trained during the hijack steps). ``progress`` is accepted for the common
        interface; there is nothing iterative to report."""
        self._require_setup("reconstruct")
        if tuple(knowledge.input_shape) != self._input_shape:
            raise ValueError(f"fsha was set up for inputs of shape {self._input_shape}; "
                             f"knowledge.input_shape is {tuple(knowledge.input_shape)}")
        a = observation.activations.detach().float().to(self._device)
        if tuple(a.shape[1:]) != self._feature_shape:
            raise ValueError(f"fsha was set up for activations shaped (B, {', '.join(map(str, self._feature_shape))}); "
                             f"got {tuple(a.shape)}")
        mean, std, low, high = knowledge.bounds()
        self._decoder.eval()
        with torch.no_grad():
            x = self._decode(a).to(mean.device)
            images = (torch.max(torch.min(x, high), low) * std + mean).clamp(0, 1)
        self._decoder.train()
        labels = None if observation.labels is None else observation.labels.cpu()
        return Reconstruction(images.cpu(), labels, iterations=self.steps, evaluations=self.steps,
                              loss=self.last.get("public_reconstruction_loss", float("nan")),
                              info={"labels_given": labels is not None, "hijack_steps": self.steps, **self.last})
