"""Attacks on what a federated server observes, and on trained models — pure PyTorch, no Flower, no fl_sim.

One interface (``attacks.base``): ``attack.reconstruct(observation, knowledge) -> Reconstruction``;
one attack per file; ``make_attack(name, **hyper_parameters)`` builds one by its config name.
"""

from attacks.base import Attack, Knowledge, ModelObservation, Observation, Reconstruction
from attacks.registry import ATTACKS, make_attack

__all__ = ["ATTACKS", "Attack", "Knowledge", "ModelObservation", "Observation", "Reconstruction", "make_attack"]
