"""Deep Leakage from Gradients — Zhu, Liu, Han (NeurIPS 2019).

Find dummy inputs x' and dummy soft labels y' = softmax(z') whose gradient matches the observed one
in Euclidean distance (their eq. 4):

    x'*, z'* = argmin ||∇W L(F(x', W), softmax(z')) - ∇W||²

optimised jointly with L-BFGS (step size 1), starting from Gaussian noise. For multi-step FedAvg
updates the client's local steps are replayed on (x', y') (``attacks.matching.UpdateSimulator``).
``max_evaluations`` bounds the number of objective evaluations (each L-BFGS step makes several).
The paper runs 300 L-BFGS steps of step size 1 without line search (a strong-Wolfe line search did
much worse here: 14 dB against 28 dB after 1,000 evaluations on CIFAR-10 image 0, ConvNet width 64);
when L-BFGS diverges (NaN) or stalls (``patience`` evaluations without a new best), it restarts with a
fresh history from the best point seen.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from attacks.base import Knowledge, Observation, Reconstruction
from attacks.matching import UpdateSimulator, l2_distance


class _BudgetSpent(Exception):
    pass


@dataclass
class DLG:
    max_evaluations: int = 3000
    lr: float = 1.0
    history_size: int = 100
    line_search: str | None = None
    init_scale: float = 1.0
    patience: int = 100  # evaluations without a new best before L-BFGS restarts from the best point
    train_mode: bool = True
    optimize_labels: bool = True  # DLG; iDLG fixes the labels it recovered (see attacks/idlg.py)
    seed: int = 0
    name: str = "dlg"

    def _labels(self, model, observation, knowledge, sim) -> torch.Tensor | None:
        """Labels to hold fixed; None: optimise them (DLG). iDLG overrides this."""
        return None

    def reconstruct(self, observation: Observation, knowledge: Knowledge,
                    progress: Callable[[int, float], None] | None = None) -> Reconstruction:
        model = knowledge.model_at(observation.before)
        sim = UpdateSimulator(model, knowledge, train_mode=self.train_mode)
        target = sim.target(observation)
        if knowledge.labels is not None:  # the threat model grants the labels: they are not optimised
            fixed = knowledge.labels.to(knowledge.device)
        else:
            fixed = None if self.optimize_labels else self._labels(model, observation, knowledge, sim)
        mean, std, low, high = knowledge.bounds()
        n = knowledge.num_examples
        gen = torch.Generator().manual_seed(self.seed)
        evaluations, steps = 0, 0
        best = (float("inf"), None, None, None)  # (objective, x, label logits, labels) of the best point evaluated
        restarts = 0
        best_eval = 0  # evaluation count when the best point was found
        while evaluations < self.max_evaluations:
            if best[1] is None:
                dtype = next(model.parameters()).dtype
                x = (self.init_scale * torch.randn((n, *knowledge.input_shape), generator=gen)).to(knowledge.device, dtype)
                z = torch.randn((n, knowledge.num_classes), generator=gen).to(knowledge.device, dtype)
            else:
                x, z = best[1].clone(), best[2].clone()
                restarts += 1
                best_eval = evaluations  # patience counts from the restart
            x.requires_grad_(True)
            z.requires_grad_(True)
            variables = [x, z] if fixed is None else [x]
            # tolerances 0: the objective is tiny near the solution and must not stop the run early
            opt = torch.optim.LBFGS(variables, lr=self.lr, history_size=self.history_size,
                                    line_search_fn=self.line_search, tolerance_grad=0.0, tolerance_change=0.0)

            def closure():
                nonlocal evaluations, best, best_eval
                if evaluations >= self.max_evaluations:
                    raise _BudgetSpent
                opt.zero_grad(set_to_none=True)
                y = torch.softmax(z, dim=1) if fixed is None else fixed
                loss = l2_distance(sim(x, y), target)
                grads = torch.autograd.grad(loss, variables)
                for v, g in zip(variables, grads):
                    v.grad = g
                evaluations += 1
                value = float(loss.detach())
                if value < best[0]:
                    labels = y.argmax(1) if fixed is None else fixed
                    best = (value, x.detach().clone(), z.detach().clone(), labels.detach().clone())
                    best_eval = evaluations
                return loss

            restart = False
            while evaluations < self.max_evaluations:
                before = evaluations
                try:
                    opt.step(closure)
                except _BudgetSpent:
                    break
                steps += 1
                if progress is not None and steps % 10 == 0:
                    progress(evaluations, best[0])
                if not torch.isfinite(x).all() or evaluations - best_eval > self.patience:
                    restart = True  # diverged, or no progress for `patience` evaluations
                    break
                if evaluations == before or best[0] < 1e-12:
                    break  # converged
            if not restart:
                break
        loss, x_best, _, y_best = best
        if x_best is None:  # every start diverged: report noise honestly
            x_best = torch.zeros((n, *knowledge.input_shape), device=knowledge.device)
            y_best = torch.zeros(n, dtype=torch.long, device=knowledge.device)
        images = (x_best * std + mean).clamp(0, 1)
        return Reconstruction(images.cpu(), y_best.cpu(), iterations=steps, evaluations=evaluations, loss=loss,
                              info={"optimizer": "L-BFGS", "labels_optimised": fixed is None,
                                    "labels_given": knowledge.labels is not None,
                                    "restarts": restarts})
