"""Server-side Flower strategies: the simulator's strategy registry (and, later, the adversarial server)."""

import fl_sim._quiet  # noqa: F401  (telemetry off before flwr is imported)

from strategies.registry import STRATEGIES, make_strategy

__all__ = ["STRATEGIES", "make_strategy"]
