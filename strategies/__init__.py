"""Server-side Flower strategies: the simulator's strategy registry, the adversarial server that
observes what clients send (``strategies.adversarial``), the guard against non-finite updates and the
SecAgg+ strategy that sees only the aggregate. They know nothing of ``fl_sim``: the process that runs
them (``fl_sim``'s CLI, runner or ``flwr run`` app) turns telemetry off before Flower is imported."""

from strategies.registry import STRATEGIES, make_strategy

__all__ = ["STRATEGIES", "make_strategy"]
