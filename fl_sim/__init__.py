"""fl_sim: federated and split learning on Flower's Simulation Engine (Ray), with attacks and defenses."""

from fl_sim import _quiet  # noqa: F401  (must run before flwr / ray are imported)

__version__ = "0.1.0"
