"""fl_sim: federated and split learning on Flower's Simulation Engine (Ray), with attacks and defenses.

The core, from the entry points down; a module imports only from the lines below its own, and
modules on one line are independent of each other (``[tool.importlinter]`` in pyproject.toml
checks it; ``tests/test_architecture.py`` runs the check):

- entry points: ``cli`` (``fl-sim``, ``python -m fl_sim``) | ``flwr_app`` (``flwr run .``)
- one run: ``runner`` (prepare, Ray backend, ``run_simulation``, resume) | ``sweep`` (the report across a sweep's runs)
- the two sides of the protocol: ``server`` (ServerApp, the federated round loop) | ``client`` (ClientApp, local training)
- ``secagg`` (the SecAgg+ server) | ``split`` (split learning's own pair: ``split.client``, ``split.server``, ``split.cut``)
  | ``inversion`` (model inversion of the final global model)
- what the sides use: ``attacking`` (the adversarial server's wiring) | ``evaluator`` (the only code holding ground
  truth next to reconstructions) | ``privacy`` (clients' DP budgets, the ledger, central DP) | ``protocol`` (client
  discovery, the round's train config) | ``client_mods`` (the client's Flower mods) | ``checkpoint``
- ``workspace`` (per-process data, model and the seeded initial model) | ``recorder`` (the run directory, summary.json)
  | ``evaluation_classifier`` (model inversion's judge, trained on every class)
- ``malicious`` (what a malicious server sends) | ``report`` | ``faults`` (a client's simulated failures) | ``sampling``
  | ``cache`` (trained GAN priors and evaluation classifiers)
- ``data`` (test split, class division, partitions) | ``models`` | ``training`` | ``metrics`` | ``validation``
- ``loaders`` (datasets as images: built-in and users' files)
- ``config`` (schema and composition); ``_quiet`` (telemetry off, before Flower or Ray is imported)

Outside the core: ``attacks`` (pure PyTorch), ``defenses`` (client side), ``strategies`` (server side) —
none of them imports ``fl_sim``.
"""

from fl_sim import _quiet  # noqa: F401  (must run before flwr / ray are imported)

__version__ = "0.1.0"
