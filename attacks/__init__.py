"""Attacks on what a federated server observes — pure PyTorch, no Flower, no fl_sim.

One interface (``attacks.base``): ``attack.reconstruct(observation, knowledge) -> Reconstruction``;
one attack per file; ``make_attack(name, **hyper_parameters)`` builds one by its config name.
"""

from attacks.base import Attack, Knowledge, Observation, Reconstruction
from attacks.registry import ATTACKS, make_attack

__all__ = ["ATTACKS", "Attack", "Knowledge", "Observation", "Reconstruction", "make_attack"]
